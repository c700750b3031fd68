"""python -m nibble.bench_sharded on 2 gloo ranks with the tiny GPT and two optimizers: it finishes,
writes a row per rank and optimizer to JSON and CSV, and nibble's 8-bit state per rank is a quarter
of fp32 AdamW's or less."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import torch

from _helpers import needs_gloo

pytestmark = needs_gloo


def test_two_ranks_write_json_and_csv(tmp_path):
    out_json, out_csv = tmp_path / "b.json", tmp_path / "b.csv"
    run = subprocess.run([sys.executable, "-m", "nibble.bench_sharded", "--worlds", "2", "--optimizers",
                          "torch,nibble-8bit", "--steps", "1", "--warmup", "1", "--seq", "16", "--timeout", "120",
                          "--json", str(out_json), "--csv", str(out_csv)],
                         env=dict(os.environ), capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "world 2, nibble-8bit:" in run.stdout
    rows = json.loads(out_json.read_text())["rows"]
    assert sorted((r["optimizer"], r["rank"]) for r in rows) == [("nibble-8bit", 0), ("nibble-8bit", 1),
                                                                   ("torch", 0), ("torch", 1)]
    for r in rows:
        assert r["world"] == 2 and r["tokens_per_s"] > 0 and r["state_bytes"] > 0 and r["final_loss"] == r["final_loss"]
    torch_state = max(r["state_bytes"] for r in rows if r["optimizer"] == "torch")
    nibble_state = max(r["state_bytes"] for r in rows if r["optimizer"] == "nibble-8bit")
    assert nibble_state * 4 <= torch_state * 1.1, (nibble_state, torch_state)
    with open(out_csv) as f:
        assert len(list(csv.DictReader(f))) == 4


def test_help_names_every_flag():
    run = subprocess.run([sys.executable, "-m", "nibble.bench_sharded", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0
    for flag in ("--worlds", "--optimizers", "--config", "--batch", "--seq", "--warmup", "--steps", "--device",
                 "--json", "--csv", "--timeout"):
        assert flag in run.stdout, flag
