# Smoke test of nibble.bench_torch: a short run of the tiny GPT on the CPU writes one JSON and one
# CSV row per optimizer and batch size with positive throughput, out-of-memory becomes a row, the
# model is causal with a tied head, and bad flag values are refused by name before anything runs.
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from nibble import bench_torch
from nibble._gpt import GPT, PRESETS
from nibble.bench_torch import main


def _nibble_classes_import() -> bool:
    try:
        from nibble import AdamW  # noqa: F401
    except ImportError:
        return False
    return True


needs_nibble = pytest.mark.skipif(not _nibble_classes_import(), reason="nibble's PyTorch classes do not import")


@pytest.mark.parametrize(
    "optimizers",
    [
        pytest.param(["torch-fused"], id="torch"),
        pytest.param(["torch-fused", "nibble-fp32", "nibble-8bit", "nibble-fp8"], id="torch+nibble", marks=needs_nibble),
    ],
)
def test_one_row_per_optimizer_and_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], optimizers: list[str]
) -> None:
    json_path, csv_path = tmp_path / "rows.json", tmp_path / "rows.csv"
    argv = ["--config", "tiny", "--device", "cpu", "--batches", "2,3", "--steps", "2", "--warmup", "1"]
    argv += ["--optimizers", ",".join(optimizers), "--json", str(json_path), "--csv", str(csv_path)]
    assert main(argv) == 0

    out = capsys.readouterr().out
    assert "device" in out and "torch" in out and "config tiny" in out
    assert "batch 2 (128 tokens/step)" in out and "batch 3 (192 tokens/step)" in out

    report = json.loads(json_path.read_text())
    assert report["skipped"] == []
    assert report["run"]["config"] == "tiny" and report["run"]["device_type"] == "cpu"
    rows = report["rows"]
    assert sorted((r["optimizer"], r["batch"]) for r in rows) == sorted(
        (name, batch) for name in optimizers for batch in (2, 3)
    )
    for r in rows:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["step_ms_median"] > 0
        assert r["state_mib"] > 0 and r["peak_mib"] >= 0
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
        # Random tokens over 65 symbols: the untrained model's loss is close to ln 65.
        assert abs(r["loss_first"] - math.log(65)) < 0.5
        # The baseline has no Δ% against itself; every other row has one.
        assert (r["delta_pct"] is None) == (r["optimizer"] == "torch-fused")
    if "nibble-8bit" in optimizers:
        # Same two fp32 moments as torch's AdamW (to a 4-byte step count per tensor); 8-bit and fp8
        # (a code per byte too) are smaller, by as much as the tensors kept in fp32 allow.
        state = {r["optimizer"]: r["state_mib"] for r in rows if r["batch"] == 2}
        assert state["nibble-fp32"] == pytest.approx(state["torch-fused"], rel=0.01)
        assert state["nibble-8bit"] < 0.5 * state["nibble-fp32"]
        assert state["nibble-fp8"] == pytest.approx(state["nibble-8bit"], rel=0.01)

    with csv_path.open(newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["optimizer"], int(r["batch"])) for r in csv_rows] == [(r["optimizer"], r["batch"]) for r in rows]
    assert all(float(r["tokens_per_s"]) > 0 for r in csv_rows)


def test_out_of_memory_is_a_row_and_the_sweep_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail_with(error: Exception) -> bench_torch.OptimizerSpec:
        def build(params: list[torch.nn.Parameter], device: torch.device) -> tuple[torch.optim.Optimizer, str]:
            raise error

        return bench_torch.OptimizerSpec(type(error).__name__, "fails", lambda device: None, build)

    for error in (torch.cuda.OutOfMemoryError("CUDA out of memory."), MemoryError("out of GPU memory"), KeyError("x")):
        spec = fail_with(error)
        monkeypatch.setitem(bench_torch.OPTIMIZERS, spec.name, spec)
    path = tmp_path / "rows.json"
    argv = ["--config", "tiny", "--device", "cpu", "--batches", "2", "--steps", "1", "--warmup", "1", "--json", str(path)]
    # An error other than out-of-memory is reported as a row too, and makes the exit status 1.
    assert main(argv + ["--optimizers", "OutOfMemoryError,torch-fused,MemoryError,KeyError"]) == 1
    rows = {r["optimizer"]: r for r in json.loads(path.read_text())["rows"]}
    assert [rows[name]["status"] for name in ("OutOfMemoryError", "MemoryError", "KeyError")] == ["OOM", "OOM", "error"]
    assert rows["torch-fused"]["status"] == "ok" and rows["torch-fused"]["tokens_per_s"] > 0
    assert main(argv + ["--optimizers", "OutOfMemoryError,torch-fused"]) == 0


def test_gpt_is_causal_with_a_tied_head() -> None:
    torch.manual_seed(0)
    model = GPT(PRESETS["tiny"])
    idx = torch.randint(32, (2, 16))  # only the first 32 of 65 tokens
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 32
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert a.shape == (2, 16, 65)
    torch.testing.assert_close(a[:, :10], b[:, :10])  # no position sees a later token
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    # Embedding rows of tokens absent from the input get a gradient only through the tied head.
    model.loss(idx, idx).backward()
    assert model.wte.weight.grad is not None and model.wte.weight.grad[32:].abs().sum() > 0


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--batches", "0"], "'0'"),
        (["--batches", "4,x"], "'x'"),
        (["--optimizers", "adamx"], "'adamx'"),
    ],
)
def test_bad_values_are_refused_by_name(capsys: pytest.CaptureFixture[str], argv: list[str], named: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2  # argparse's usage error, before anything is measured
    err = capsys.readouterr().err
    assert named in err
    if argv[0] == "--optimizers":
        assert "known: torch-fused" in err and "nibble-8bit" in err


def test_each_torchao_row_checks_its_own_class(monkeypatch: pytest.MonkeyPatch) -> None:
    # A torchao without AdamWFp8 (older releases) skips only the fp8 row, saying why.
    import types

    fake = types.ModuleType("torchao")
    fake.__version__ = "0.0-test"
    fake_optim = types.ModuleType("torchao.optim")
    fake_optim.AdamW8bit = fake_optim.AdamW4bit = object
    fake.optim = fake_optim
    monkeypatch.setitem(sys.modules, "torchao", fake)
    monkeypatch.setitem(sys.modules, "torchao.optim", fake_optim)
    cpu = torch.device("cpu")
    assert bench_torch.OPTIMIZERS["torchao-8bit"].unavailable(cpu) is None
    assert bench_torch.OPTIMIZERS["torchao-4bit"].unavailable(cpu) is None
    reason = bench_torch.OPTIMIZERS["torchao-fp8"].unavailable(cpu)
    assert reason is not None and "AdamWFp8" in reason and "0.0-test" in reason
