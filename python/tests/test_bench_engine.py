"""python -m nibble.bench_engine: both engines train the same text, the report holds every run, the
busy process ends with the benchmark, and bad arguments are refused naming the value."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from nibble import _safetensors, bench_engine

HERE = Path(__file__).resolve().parent
CLI = Path(os.environ.get("NIBBLE_CLI", HERE.parents[1] / "build" / "nibble"))
needs_cli = pytest.mark.skipif(not CLI.is_file(), reason=f"the nibble program is not built at {CLI}")
TINY = ["--steps", "3", "--seeds", "1", "--layers", "1", "--heads", "2", "--width", "16", "--context", "8",
        "--batch", "2", "--warmup", "1", "--eval-batches", "2"]


@needs_cli
def test_python_reads_the_text_and_vocabulary_nibble_trains_on(tmp_path):
    # `nibble train` saves its tokenizer in the model file: the benchmark's tokenizer of the same
    # default corpus must have the same vocabulary, or the two engines would not train alike.
    subprocess.run([str(CLI), "train", "--preset", "tiny", "--steps", "1", "--batch", "1", "--seq", "8",
                    "--eval-batches", "1", "--save-every", "1", "--checkpoint-dir", str(tmp_path)],
                   check=True, stdout=subprocess.DEVNULL, timeout=120)
    saved = json.loads(_safetensors.read(str(tmp_path / "model.safetensors"))[1]["vocab_bytes"])
    text = bench_engine.default_corpus()
    train, val, vocab = bench_engine.split_tokens(text, 0.1)
    assert sorted(set(text)) == saved and vocab == len(saved)
    assert len(val) == round(len(text) * 0.1) and len(train) + len(val) == len(text)


@needs_cli
def test_both_engines_idle_and_busy_reach_the_report(tmp_path):
    report = tmp_path / "runs.json"
    done = subprocess.run([sys.executable, "-m", "nibble.bench_engine", "--nibble", str(CLI), *TINY, "--busy",
                           "--nibble-model", "nanogpt", "--json", str(report), "--csv", str(tmp_path / "runs.csv")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    runs = json.loads(report.read_text())["runs"]
    assert sorted((r["engine"], r["load"]) for r in runs) == [("nibble", "busy"), ("nibble", "idle"),
                                                             ("torch", "busy"), ("torch", "idle")]
    for r in runs:
        assert r["steps"] == 3 and r["step_ms_median"] > 0 and math.isfinite(r["val_loss"]), r
    # An untrained model's loss is near log(vocabulary): both engines report the same kind of number.
    assert all(2.0 < r["val_loss"] < 6.0 for r in runs)
    assert "nibble takes" in done.stdout and "slower with a busy core" in done.stdout
    assert all(r["detail"].endswith("--no-bias --gelu exact") for r in runs if r["engine"] == "nibble")
    # The busy process is gone: no python spinning on the benchmark's behalf.
    left = subprocess.run(["pgrep", "-f", "while time.time\\(\\) < end"], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"a busy process outlived the benchmark: {left.stdout}"


def test_torch_engine_alone_learns_on_given_text(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    report = tmp_path / "runs.json"
    args = ["--steps", "60", "--seeds", "1", "--layers", "1", "--heads", "2", "--width", "16", "--context", "16",
            "--batch", "8", "--warmup", "2", "--eval-batches", "4", "--lr", "1e-2"]
    done = subprocess.run([sys.executable, "-m", "nibble.bench_engine", "--engines", "torch", "--data", str(text),
                           *args, "--json", str(report)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (run,) = json.loads(report.read_text())["runs"]
    # 28 distinct characters: an untrained model is near log(28) = 3.3; 60 steps on a repeated
    # sentence must get well below that.
    assert run["val_loss"] < 2.5, run


@pytest.mark.parametrize("args,words", [
    (["--steps", "0"], ["--steps", "at least 1"]),
    (["--engines", "jax"], ["--engines", "jax"]),
    (["--warmup", "50", "--steps", "10"], ["--warmup", "50"]),
    (["--width", "10", "--heads", "4"], ["--width 10", "--heads 4"]),
    (["--lr", "nan"], ["--lr", "nan"]),
    (["--lr", "1e-3", "--min-lr", "1e-2"], ["--min-lr 0.01", "--lr 0.001"]),
])
def test_bad_arguments_are_named(args, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_engine.main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err
