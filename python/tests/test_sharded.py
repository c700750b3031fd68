"""nibble on torch.distributed (gloo, CPU): FSDP2 for every algorithm and precision, replicated and
whole-on-one-rank DTensors, mixed precisions, cross-rank clipping and skipping, DDP, ZeRO and bad
input, each against single-process nibble, at world sizes 1 (nothing split: the whole-tensor
algorithms train), 2 and 4. One launch of sharded_worker.py per world size runs every case; each
case is reported as its own test. With a GPU, the same cases (but bad input) at
world size 1 on NCCL against single-process nibble on CUDA."""
from __future__ import annotations

import pytest

from _helpers import ALGORITHMS, REPLICATED, SHARDED_PRECISIONS, assert_case, launch, needs_gloo, needs_nccl

WORKER = "sharded_worker.py"
CASES = [f"fsdp-{a}-{p}" for a in ALGORITHMS for p in SHARDED_PRECISIONS]
CASES += [f"{kind}-{a}" for a in REPLICATED for kind in ("replicated", "whole-rows")]
CASES += ["mixed-precisions", "clipping", "nan-on-one-rank", "grad-scaler", "ddp", "zero", "zero-resume", "bad-input"]

pytestmark = needs_gloo


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"world{w}")
def world_results(request, tmp_path_factory):
    return launch(request.param, tmp_path_factory.mktemp(f"world{request.param}"), WORKER)


@pytest.mark.parametrize("case", CASES)
def test_sharded_equals_single_process(world_results, case):
    assert_case(world_results, case)


@pytest.fixture(scope="module")
def cuda_results(tmp_path_factory):
    return launch(1, tmp_path_factory.mktemp("cuda"), WORKER, phase=["cuda"])


@needs_nccl
@pytest.mark.parametrize("case", [c for c in CASES if c != "bad-input"])
def test_sharded_on_cuda_equals_single_process(cuda_results, case):
    assert_case(cuda_results, case)
