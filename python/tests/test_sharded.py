"""nibble on torch.distributed (gloo, CPU): FSDP2 for every algorithm and precision, replicated and
whole-on-one-rank DTensors, mixed precisions, cross-rank clipping and skipping, DDP, ZeRO and bad
input, each against single-process nibble. One launch of sharded_worker.py per world size runs
every case; each case is reported as its own test."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("sharded_worker.py")
LAUNCH_TIMEOUT_S = 240
CASES = [f"fsdp-{a}-{p}" for a in ("sgd", "adam", "adamw", "lion", "qhm", "sophiag", "adafactor", "adamp")
         for p in ("fp32", "8bit", "4bit")]
CASES += [f"{kind}-{a}" for a in ("adafactor", "adamp", "adamw") for kind in ("replicated", "whole-rows")]
CASES += ["mixed-precisions", "clipping", "nan-on-one-rank", "grad-scaler", "ddp", "zero", "zero-resume", "bad-input"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out: Path, worker: str = WORKER.name, phase: list[str] = (), prefix: str = "") -> dict:
    """Runs every case of `worker` (a script beside this file; `phase` its leading arguments) on
    `world` ranks, each writing OUT/<prefix>rank<r>.json; returns {case: [result per rank]}. Every
    rank is killed if the launch outlives its timeout."""
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = str(WORKER.with_name(worker))
    procs = [subprocess.Popen([sys.executable, script, *phase, str(rank), str(world), port, str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=LAUNCH_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {world}-rank launch did not finish in {LAUNCH_TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results: dict = {}
    for rank, p in enumerate(procs):
        path = out / f"{prefix}rank{rank}.json"
        if p.returncode != 0 or not path.exists():
            pytest.fail(f"rank {rank} of {world} exited with {p.returncode}:\n" + "\n".join(logs)[-4000:])
        for case, result in json.loads(path.read_text()).items():
            results.setdefault(case, []).append(result)
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def world_results(request, tmp_path_factory):
    return launch(request.param, tmp_path_factory.mktemp(f"world{request.param}"))


@pytest.mark.parametrize("case", CASES)
def test_sharded_equals_single_process(world_results, case):
    assert case in world_results, f"the worker did not run {case}"
    failures = [f"rank {rank}:\n{r['note']}" for rank, r in enumerate(world_results[case]) if not r["ok"]]
    assert not failures, "\n".join(failures)
    notes = {r["note"] for r in world_results[case]}
    assert len(notes) == 1, f"ranks disagree: {notes}"
