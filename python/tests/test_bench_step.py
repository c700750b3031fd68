# Test of nibble.bench_step on the tiny GPT's parameters on the CPU: one row per optimizer with
# positive step times, the baseline first whatever the order asked, the update error near 0 for
# nibble's fp32 AdamW and near 1 for an optimizer that does not step, failing optimizers as rows,
# JSON and CSV written, and bad flag values refused by name before anything runs.
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from nibble import bench_step, bench_torch
from nibble.bench_step import main
from test_bench_torch import needs_nibble

ARGV = ["--config", "tiny", "--device", "cpu", "--steps", "3", "--warmup", "2"]


def _spec(name: str, build: bench_torch.Builder) -> bench_torch.OptimizerSpec:
    return bench_torch.OptimizerSpec(name, "made by the test", lambda device: None, build)


@needs_nibble
def test_rows_figures_and_update_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # An optimizer that takes steps of size 0: its parameters stay where they started.
    still = _spec("still", lambda params, device: (torch.optim.SGD(params, lr=0.0), "SGD(lr=0)"))
    monkeypatch.setitem(bench_torch.OPTIMIZERS, "still", still)
    json_path, csv_path = tmp_path / "rows.json", tmp_path / "rows.csv"
    names = ["nibble-fp32", "still", "torch-fused", "nibble-8bit", "nibble-fp8"]
    argv = ARGV + ["--optimizers", ",".join(names), "--json", str(json_path), "--csv", str(csv_path)]
    assert main(argv) == 0

    out = capsys.readouterr().out
    assert "config tiny" in out and "update err" in out
    report = json.loads(json_path.read_text())
    assert report["skipped"] == [] and report["run"]["params"] == 108352
    rows = {r["optimizer"]: r for r in report["rows"]}
    # The baseline is measured first, the others in the order asked.
    assert [r["optimizer"] for r in report["rows"]] == ["torch-fused", "nibble-fp32", "still", "nibble-8bit",
                                                          "nibble-fp8"]
    for r in rows.values():
        assert r["status"] == "ok", r
        assert 0 < r["step_ms_min"] <= r["step_ms_median"] and r["first_step_s"] > 0
        assert (r["delta_pct"] is None) == (r["optimizer"] == "torch-fused")
    assert rows["torch-fused"]["update_error"] == 0.0
    # nibble's fp32 AdamW is torch's to rounding; quantized state within its rounding; SGD(lr=0)
    # moved nothing, so its distance is the whole baseline update.
    assert rows["nibble-fp32"]["update_error"] < 1e-5
    assert 0 < rows["nibble-8bit"]["update_error"] < 0.1 and 0 < rows["nibble-fp8"]["update_error"] < 0.1
    assert rows["still"]["update_error"] == pytest.approx(1.0, abs=1e-9)
    assert rows["nibble-fp32"]["state_mib"] == pytest.approx(rows["torch-fused"]["state_mib"], rel=0.01)
    assert rows["nibble-8bit"]["state_mib"] < 0.5 * rows["nibble-fp32"]["state_mib"]

    with csv_path.open(newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["optimizer"] for r in csv_rows] == [r["optimizer"] for r in report["rows"]]
    assert all(float(r["step_ms_median"]) > 0 and r["config"] == "tiny" for r in csv_rows)


@needs_nibble
def test_bitsandbytes_and_torchao_are_rows_beside_nibble(tmp_path: Path) -> None:
    # The real packages (scripts/python-setup installs them), stepped on the same parameters and
    # gradients as nibble in the same process: their 8-bit state is the size of nibble's, and their
    # updates as far from torch's as quantized state puts them.
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("torchao.optim")
    path = tmp_path / "rows.json"
    assert main(ARGV + ["--optimizers", "torch-fused,nibble-8bit,bnb-8bit,torchao-8bit", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["skipped"] == []
    rows = {r["optimizer"]: r for r in report["rows"]}
    for name in ("bnb-8bit", "torchao-8bit"):
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["step_ms_median"] > 0
        assert 0 < rows[name]["update_error"] < 0.1
        assert rows[name]["state_mib"] == pytest.approx(rows["nibble-8bit"]["state_mib"], rel=0.25)


def test_failures_are_rows_and_the_run_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail_with(error: Exception) -> bench_torch.OptimizerSpec:
        def build(params: list[torch.nn.Parameter], device: torch.device) -> tuple[torch.optim.Optimizer, str]:
            raise error

        return _spec(type(error).__name__, build)

    for error in (MemoryError("out of GPU memory"), KeyError("x")):
        spec = fail_with(error)
        monkeypatch.setitem(bench_torch.OPTIMIZERS, spec.name, spec)
    path = tmp_path / "rows.json"
    # An error other than out-of-memory is a row too, and makes the exit status 1.
    assert main(ARGV + ["--optimizers", "MemoryError,torch-fused,KeyError", "--json", str(path)]) == 1
    rows = {r["optimizer"]: r for r in json.loads(path.read_text())["rows"]}
    assert [rows[name]["status"] for name in ("MemoryError", "KeyError")] == ["OOM", "error"]
    assert rows["torch-fused"]["status"] == "ok" and math.isfinite(rows["torch-fused"]["step_ms_median"])
    assert main(ARGV + ["--optimizers", "MemoryError,torch-fused"]) == 0


def test_without_the_baseline_there_is_no_comparison(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sgd = _spec("sgd", lambda params, device: (torch.optim.SGD(params, lr=0.1), "SGD(lr=0.1)"))
    monkeypatch.setitem(bench_torch.OPTIMIZERS, "sgd", sgd)
    path = tmp_path / "rows.json"
    assert main(ARGV + ["--optimizers", "sgd", "--json", str(path)]) == 0
    (row,) = json.loads(path.read_text())["rows"]
    assert row["status"] == "ok" and row["delta_pct"] is None and row["update_error"] is None


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--steps", "0"], "'0'"),
        (["--warmup", "x"], "'x'"),
        (["--optimizers", "adamx"], "'adamx'"),
        (["--json", "/no/such/dir/rows.json"], "'/no/such/dir'"),
    ],
)
def test_bad_values_are_refused_by_name(capsys: pytest.CaptureFixture[str], argv: list[str], named: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2  # argparse's usage error, before anything is measured
    assert named in capsys.readouterr().err


def test_help_names_every_optimizer(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in bench_step.OPTIMIZERS)
