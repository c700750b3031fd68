"""Helpers shared by nibble's Python tests: the algorithms every test covers. In the test process:
the gloo marker, launching a
multi-rank worker (one process per rank, all killed past a timeout) and checking its per-case
results. In a rank's process: starting gloo and running the cases, the model, data and exact
gradients the workers compare with single-process nibble, and nibble's state as the library holds it."""
from __future__ import annotations

import copy
import datetime
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist

import nibble

HERE = Path(__file__).resolve().parent
LAUNCH_TIMEOUT_S = 240

# Every algorithm, with the keywords the sharded tests train it with: test_optim takes the classes,
# sharded_worker and test_sharded the names.
ALGORITHMS = {
    "sgd": (nibble.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "adam": (nibble.Adam, dict(lr=1e-2, weight_decay=1e-2)),
    "adamw": (nibble.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "radam": (nibble.RAdam, dict(lr=1e-2, weight_decay=1e-2)),
    "lion": (nibble.Lion, dict(lr=1e-3, weight_decay=0.1)),
    "qhm": (nibble.QHM, dict(lr=0.05)),
    "sophiag": (nibble.SophiaG, dict(lr=1e-3)),
    "adafactor": (nibble.Adafactor, dict()),
    "adamp": (nibble.AdamP, dict(lr=1e-2, weight_decay=1e-2)),
    "adopt": (nibble.ADOPT, dict(lr=1e-2, weight_decay=1e-2, decouple=True)),
    "ademamix": (nibble.AdEMAMix, dict(lr=1e-2, weight_decay=1e-2, alpha_warmup=4, beta3_warmup=4)),
    "adamw_schedulefree": (nibble.AdamWScheduleFree, dict(lr=1e-2, weight_decay=1e-2, warmup_steps=4)),
    "muon": (nibble.Muon, dict(lr=2e-2, weight_decay=1e-2, adamw_lr=1e-2)),
}
WHOLE_TENSOR = ("adafactor", "adamp", "muon")  # refuse a split tensor (muon: a split matrix)
REPLICATED = WHOLE_TENSOR + ("adamw",)  # also run on replicated and on whole-row DTensors
SHARDED_PRECISIONS = ("fp32", "8bit", "4bit", "fp8")

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
needs_nccl = pytest.mark.skipif(not (nibble.cuda_available() and torch.cuda.is_available() and dist.is_available()
                                     and dist.is_nccl_available()),
                                reason="needs a CUDA device, nibble's CUDA build and NCCL")

_DEVICE = ["cpu"]  # where a rank's cases put models and data: "cpu" (gloo) or "cuda" (NCCL); see run_rank


def device() -> torch.device:
    """The device of this rank's cases (run_rank's `device`)."""
    return torch.device(_DEVICE[0])


# -- in the test process ----------------------------------------------------------------------------

def launch(world: int, out: Path, worker: str, phase: list[str] = (), prefix: str = "") -> dict:
    """Runs every case of `worker` (a script in this folder; `phase` its leading arguments) on
    `world` ranks, each writing OUT/<prefix>rank<r>.json; returns {case: [result per rank]}. Every
    rank is killed if the launch outlives its timeout."""
    # The ranks meet through a file store in a fresh folder: no port to pick, so no other process can
    # take it between the pick and the bind.
    store = str(Path(tempfile.mkdtemp(prefix="rendezvous-", dir=out)) / "store")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = str(HERE / worker)
    procs = [subprocess.Popen([sys.executable, script, *phase, str(rank), str(world), store, str(out)], env=env,
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


def assert_case(results: dict, case: str) -> None:
    """The case ran and passed on every rank, and every rank wrote the same note."""
    assert case in results, f"the worker did not run {case}"
    failures = [f"rank {rank}:\n{r['note']}" for rank, r in enumerate(results[case]) if not r["ok"]]
    assert not failures, "\n".join(failures)
    notes = {r["note"] for r in results[case]}
    assert len(notes) == 1, f"ranks disagree: {notes}"


# -- in a rank's process ----------------------------------------------------------------------------

def run_rank(rank: int, world: int, store: str, out_file: str,
             cases: Callable[["torch.distributed.device_mesh.DeviceMesh"], dict[str, Callable[[], str]]],
             device: str = "cpu") -> None:
    """Joins the process group of `world` ranks (gloo on the CPU; NCCL, GPU `rank`, on "cuda"),
    runs every case of `cases(mesh)` (mesh: all ranks, one dimension) with a barrier after each,
    and writes {case: {"ok", "note"}} to `out_file`: a case returns its note or raises, and then its
    note is the traceback. It does not return: the rank's process ends (exit status 0) once the file
    is written."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    _DEVICE[0] = device
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    mesh = init_device_mesh(device, (world,))
    results = {}
    for name, run in cases(mesh).items():
        try:
            results[name] = {"ok": True, "note": run()}
        except Exception:  # reported to the test, which fails naming the case
            results[name] = {"ok": False, "note": traceback.format_exc()}
            print(f"case {name} failed:\n{results[name]['note']}", file=sys.stderr, flush=True)
        dist.barrier()
    with open(out_file, "w") as f:
        json.dump(results, f)
    # Every case ended with a barrier, so no collective is in flight: the rank ends here without
    # tearing the group down, which in torch's gloo backend was seen to abort a rank now and then
    # ("terminate called without an active exception") after its results were written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def mlp() -> torch.nn.Module:
    """(128, 32): 4096 elements, quantized by the global min_quant_size and block-aligned shards at 2
    and 4 ranks; (13, 128): uneven shards; (3, 13) and (3,): fewer rows than 4 ranks (an empty
    local shard)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 13), torch.nn.Tanh(),
                               torch.nn.Linear(13, 3)).to(device())


def batch(step: int) -> torch.Tensor:
    return torch.randn(8, 32, generator=torch.Generator().manual_seed(100 + step)).to(device())


def fully_sharded(ref: torch.nn.Module) -> torch.nn.Module:
    """A copy of `ref` under FSDP2: each Linear and the whole model fully_shard-ed."""
    from torch.distributed.fsdp import fully_shard

    sharded = copy.deepcopy(ref)
    for layer in sharded:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(sharded)
    return sharded


def full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (gathered from every rank), a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p


def rows_of(p: torch.Tensor) -> tuple[int, int]:
    """(first row, rows) of this rank's Shard(0) piece, torch.chunk's layout."""
    n, world = p.shape[0], p.device_mesh.size()
    piece = -(-n // world)
    start = min(dist.get_rank() * piece, n)
    return start, p.to_local().shape[0]


def exact_grads(ref: torch.nn.Module, sharded: torch.nn.Module) -> None:
    """Overwrites every sharded gradient with the exact slice of the single-process one."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for pr, ps in zip(ref.parameters(), sharded.parameters()):
            if isinstance(ps, DTensor) and ps.placements[0].is_shard():
                start, rows = rows_of(ps)
                ps.grad.to_local().copy_(pr.grad[start:start + rows])
            elif isinstance(ps, DTensor):
                ps.grad.to_local().copy_(pr.grad)
            else:
                ps.grad.copy_(pr.grad)


def library_state(opt: torch.optim.Optimizer, group: int = 0) -> dict[str, torch.Tensor]:
    """The tensors of the state file nibble's library writes for one parameter group of `opt`
    (codes, absmax and codebooks as held, not as state_dict() shows them)."""
    return opt._groups[group].save()[0]


def expect_error(kind: type, words: list[str], fn: Callable[[], object]) -> None:
    """fn() raises `kind` with every one of `words` in its message."""
    try:
        fn()
    except kind as e:
        for w in words:
            if w not in str(e):
                raise AssertionError(f"the error does not say {w!r}: {e}")
        return
    raise AssertionError(f"no {kind.__name__} raised")
