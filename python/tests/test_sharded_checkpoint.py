"""Distributed checkpoints of nibble's sharded optimizers (gloo, CPU): FSDP2 training saved with
torch.distributed.checkpoint on 2 ranks, loaded on 1 and on 4 ranks and continued against the run
that was not interrupted; get/set_optimizer_state_dict round trips; refused layouts. One launch of
checkpoint_worker.py per phase runs every case; each case is reported as its own test. With a GPU,
the save phase at world size 1 on NCCL (save, load back, round trips, refusals)."""
from __future__ import annotations

import pytest

from _helpers import assert_case, launch, needs_gloo, needs_nccl

CASES = ("fp32", "bf16", "8bit", "4bit", "8bit-cut", "4bit-cut", "schedulefree", "adafactor-whole")
SAVE_CASES = [f"save-{c}" for c in CASES] + ["bad-layouts"]
LOAD_CASES = [f"load-{c}" for c in CASES]

pytestmark = needs_gloo


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The 2-rank save, then the loads on 1 and 4 ranks from its checkpoints."""
    out = tmp_path_factory.mktemp("checkpoints")
    results = {"save": launch(2, out, "checkpoint_worker.py", ["save"], prefix="save-")}
    for world in (1, 4):
        results[f"load{world}"] = launch(world, out, "checkpoint_worker.py", ["load"], prefix="load-")
    return results


@pytest.mark.parametrize("case", SAVE_CASES)
def test_save_on_two_ranks(checkpoints, case):
    assert_case(checkpoints["save"], case)


@pytest.mark.parametrize("world", [1, 4])
@pytest.mark.parametrize("case", LOAD_CASES)
def test_load_on_other_world_sizes(checkpoints, case, world):
    assert_case(checkpoints[f"load{world}"], case)


@pytest.fixture(scope="module")
def cuda_checkpoints(tmp_path_factory):
    return launch(1, tmp_path_factory.mktemp("cuda-checkpoints"), "checkpoint_worker.py", ["save", "cuda"],
                  prefix="save-")


@needs_nccl
@pytest.mark.parametrize("case", [c for c in SAVE_CASES if c != "save-adafactor-whole"])
def test_save_and_load_on_one_gpu(cuda_checkpoints, case):
    assert_case(cuda_checkpoints, case)
