"""One rank of nibble's sharded-checkpoint tests (test_sharded_checkpoint.py starts one process per
rank): "save" on 2 gloo ranks writes distributed checkpoints (DCP) of FSDP2 training and checks
get/set_optimizer_state_dict round trips and refused layouts; "load" on 1 or 4 ranks reads them back
and continues, against the run that was not interrupted. With "cuda" after the phase, the ranks
use NCCL and one GPU each (the "save" phase at world size 1 on one GPU: save, load at the same
world size, get/set round trips, refused layouts).
Usage: python checkpoint_worker.py save|load [cpu|cuda] RANK WORLD PORT OUT_DIR"""
from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import nibble
from _helpers import batch, exact_grads, expect_error, full, fully_sharded, library_state, mlp, rows_of, run_rank

STEPS_BEFORE, STEPS_AFTER = 5, 5
LR = 1e-2
# name: (optimizer keywords, whether every quantized tensor's blocks start at the same elements at 1,
# 2 and 4 ranks). At min_quant_size 4096 only the (128, 32) weight is quantized, cut into equal
# shards that are whole blocks; at 0 the (13, 128) weight and the biases are too, and their shards
# cut blocks differently at each world size.
CASES = {
    "fp32": (dict(precision="fp32"), True),
    "bf16": (dict(precision="bf16"), True),
    "8bit": (dict(precision="8bit"), True),
    "4bit": (dict(precision="4bit"), True),
    "8bit-cut": (dict(precision="8bit", min_quant_size=0), False),
    "4bit-cut": (dict(precision="4bit", min_quant_size=0), False),
    # Schedule-free AdamW: its per-parameter lr_max and weight_sum travel beside the state.
    "schedulefree": (dict(cls=nibble.AdamWScheduleFree, warmup_steps=2), True),
}


def optimizer(params, kwargs: dict):
    """The case's optimizer (nibble.AdamW unless the case names another class) at lr LR."""
    kwargs = dict(kwargs)
    return kwargs.pop("cls", nibble.AdamW)(params, lr=LR, **kwargs)


# These go through get/set_optimizer_state_dict (parameters named by their module paths); the others
# through the optimizer's own state_dict/load_state_dict (parameters numbered).
HELPER_CASES = ("fp32", "8bit", "4bit-cut")


def train(sharded, opt, steps: range) -> None:
    """Steps with the single-process gradient of the sharded model's current weights (gathered
    exactly), sliced to each rank: runs at any world size see the same gradients for the same
    weights, so a resumed run can equal the uninterrupted one bit for bit."""
    shadow = mlp()
    for step in steps:
        with torch.no_grad():
            for q, p in zip(shadow.parameters(), sharded.parameters()):
                q.copy_(p.full_tensor())
        x = batch(step)
        for net in (shadow, sharded):
            net.zero_grad()
            net(x).square().mean().backward()
        exact_grads(shadow, sharded)
        opt.step()


def full_state(opt) -> dict:
    """{(parameter index, name): the whole tensor} of a sharded optimizer's state_dict."""
    out = {}
    for key, entry in opt.state_dict()["state"].items():
        for name, t in entry.items():
            out[(key, name)] = full(t).detach().clone()
    return out


def codec_error_bound(opt) -> dict:
    """Per codebook: the largest distance from a normalised value in [-1, 1] to its code, as a
    fraction of the block's absmax (half the widest gap, or the smallest code of a map without 0)."""
    bounds = {}
    for name, values in library_state(opt).items():
        if name.startswith("codebook."):
            v = values.sort().values.double()
            gap = (v[1:] - v[:-1]).max().item() / 2
            bounds[name[len("codebook."):]] = max(gap, v[0].item() if v[0] > 0 else 0.0)
    return bounds


def new_run(kwargs):
    ref = mlp()
    sharded = fully_sharded(ref)
    return ref, sharded, optimizer(ref.parameters(), kwargs), optimizer(sharded.parameters(), kwargs)


def assert_equal(got: list, want: list, what: str) -> None:
    for i, (a, b) in enumerate(zip(got, want)):
        if not torch.equal(a, b):
            raise AssertionError(f"{what}: parameter {i} differs (max |diff| {(a - b).abs().max().item()})")


def assert_same_state(a: dict, b: dict, what: str) -> None:
    for name, t in a.items():
        if not torch.equal(t, b[name]):
            raise AssertionError(f"{what}: state tensor {name} differs")


# -- "save" on 2 ranks ------------------------------------------------------------------------------

def case_save(name: str, out: str) -> str:
    kwargs, _ = CASES[name]
    ref, sharded, opt_ref, opt_sh = new_run(kwargs)
    train(sharded, opt_sh, range(STEPS_BEFORE))
    model_sd = sharded.state_dict()
    optim_sd = get_optimizer_state_dict(sharded, opt_sh) if name in HELPER_CASES else opt_sh.state_dict()
    for key, entry in optim_sd["state"].items():
        for k, t in entry.items():
            if k not in ("step", "lr_max", "weight_sum") and not isinstance(t, DTensor):
                raise AssertionError(f"state {key}.{k} is {type(t).__name__}, not a DTensor")
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(out, f"ckpt-{name}"))
    saved_values = full_state(opt_sh)
    at_save = [p.full_tensor().detach().clone() for p in sharded.parameters()]
    bounds = codec_error_bound(opt_sh)
    # The same world size: a fresh optimizer takes the checkpoint back, codes and absmax included.
    twin = fully_sharded(mlp())
    opt_twin = optimizer(twin.parameters(), kwargs)
    load_checkpoint(name, twin, opt_twin, out)
    assert_same_state(library_state(opt_sh), library_state(opt_twin), "DCP at the same world size")
    # get/set_optimizer_state_dict in memory, into a third optimizer.
    third = fully_sharded(mlp())
    opt_third = optimizer(third.parameters(), kwargs)
    set_optimizer_state_dict(third, opt_third, get_optimizer_state_dict(sharded, opt_sh))
    assert_same_state(library_state(opt_sh), library_state(opt_third), "get/set_optimizer_state_dict")
    if opt_third.counters() != opt_sh.counters():
        raise AssertionError(f"step counters {opt_third.counters()} after loading, {opt_sh.counters()} saved")
    # The run that is not interrupted, at 2 ranks, and the twin resumed from the checkpoint.
    with torch.no_grad():
        for p, q in zip(twin.parameters(), sharded.parameters()):
            if not torch.equal(p.full_tensor(), q.full_tensor()):
                raise AssertionError("the model did not come back from the checkpoint")
    train(sharded, opt_sh, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
    train(twin, opt_twin, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
    assert_equal([p.full_tensor() for p in sharded.parameters()], [p.full_tensor() for p in twin.parameters()],
                 f"{name}: resumed at 2 ranks against the uninterrupted run")
    final = [p.full_tensor().detach() for p in sharded.parameters()]
    if dist.get_rank() == 0:
        torch.save({"values": saved_values, "bounds": bounds, "final": final,
                    "at_save": at_save},
                   os.path.join(out, f"ref-{name}.pt"))
    return "saved"


def expect_refusal(opt, words, state_dict) -> None:
    before = library_state(opt)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    expect_error(ValueError, words, lambda: opt.load_state_dict(state_dict))
    assert_same_state(before, library_state(opt), f"a refused load ({words}) changed the state")
    now = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    if now != groups:
        raise AssertionError(f"a refused load ({words}) changed the parameter groups")


def case_bad_layouts() -> str:
    ref, sharded, opt_ref, opt = new_run(dict(precision="8bit"))
    train(sharded, opt, range(2))
    good = opt.state_dict()
    other_ref = mlp()
    lion = nibble.Lion(fully_sharded(other_ref).parameters(), lr=1e-4)
    expect_refusal(lion, ["'adamw'", "'lion'"], good)
    missing = copy.deepcopy(good)
    del missing["state"][2]["exp_avg_sq"]
    expect_refusal(opt, ["parameter 2", "'exp_avg_sq'"], missing)
    torch.manual_seed(1)
    wider = fully_sharded(torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 14),
                                              torch.nn.Tanh(), torch.nn.Linear(14, 3)))
    wider_opt = nibble.AdamW8bit(wider.parameters(), lr=LR)
    expect_refusal(opt, ["parameter 2", "[14, 128]", "[13, 128]"], wider_opt.state_dict())
    expect_refusal(opt, ["not a sharded nibble state"], opt_ref.state_dict())
    bad_values = copy.deepcopy(good)
    bad_values["state"][0]["exp_avg_sq"].to_local().view(-1)[0] = -1.0  # (128, 32): rows on every rank
    expect_refusal(opt, ["exp_avg_sq", "must be >= 0"], bad_values)
    return "refused"


# -- factored Adafactor state of tensors a sharded placement leaves whole on one rank ---------------
#
# (1, 64) and (1, 16) under Shard(0): rank 0 holds each whole at 1, 2 and 4 ranks, the others an
# empty shard; Adafactor factors them (with a first moment, so a DTensor slot travels beside the
# factors). The gradients depend on the step only, so every world size sees the same ones.

WHOLE_SHAPES = [(1, 64), (1, 16)]


def whole_run(mesh):
    torch.manual_seed(0)
    model = torch.nn.ParameterList([torch.nn.Parameter(distribute_tensor(torch.randn(*s), mesh, [Shard(0)]))
                                    for s in WHOLE_SHAPES])
    return model, nibble.Adafactor(model.parameters(), beta1=0.9)


def whole_train(model, opt, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for p in model:
                grad = torch.randn(p.shape, generator=gen)
                start, rows = rows_of(p)
                p.grad = DTensor.from_local(grad[start:start + rows].clone(), p.device_mesh, p.placements,
                                            shape=p.shape, stride=p.stride())
        opt.step()


def whole_checkpoint(model, opt, out: str, save: bool) -> None:
    sd = {"model": model.state_dict(), "optim": opt.state_dict()}
    if save:
        dcp.save(sd, checkpoint_id=os.path.join(out, "ckpt-adafactor-whole"))
        return
    dcp.load(sd, checkpoint_id=os.path.join(out, "ckpt-adafactor-whole"))
    model.load_state_dict(sd["model"])
    opt.load_state_dict(sd["optim"])


def case_save_adafactor_whole(mesh, out: str) -> str:
    model, opt = whole_run(mesh)
    whole_train(model, opt, range(STEPS_BEFORE))
    state = opt.state_dict()["state"]
    for key, entry in state.items():
        if sorted(entry) != ["exp_avg", "exp_avg_sq_col", "exp_avg_sq_row", "step"]:
            raise AssertionError(f"rank {dist.get_rank()}: parameter {key} saves {sorted(entry)}")
        for name in ("exp_avg_sq_row", "exp_avg_sq_col"):
            gathered = [torch.empty_like(entry[name]) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, entry[name])
            if not all(torch.equal(g, gathered[0]) for g in gathered) or not (gathered[0] > 0).all():
                raise AssertionError(f"parameter {key}: {name} differs between ranks or is not the holder's")
    whole_checkpoint(model, opt, out, save=True)
    twin, opt_twin = whole_run(mesh)
    whole_checkpoint(twin, opt_twin, out, save=False)
    if not all(torch.equal(p.full_tensor(), q.full_tensor()) for p, q in zip(twin, model)):
        raise AssertionError("the model did not come back from the checkpoint")
    assert_same_state(library_state(opt), library_state(opt_twin), "adafactor-whole: DCP at the same world size")
    whole_train(model, opt, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
    whole_train(twin, opt_twin, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
    final = [p.full_tensor().detach() for p in model]
    assert_equal([p.full_tensor() for p in twin], final, "adafactor-whole: resumed at 2 ranks")
    if dist.get_rank() == 0:
        torch.save({"final": final}, os.path.join(out, "ref-adafactor-whole.pt"))
    return "saved"


def case_load_adafactor_whole(mesh, out: str) -> str:
    saved = torch.load(os.path.join(out, "ref-adafactor-whole.pt"), weights_only=False)
    model, opt = whole_run(mesh)
    whole_checkpoint(model, opt, out, save=False)
    whole_train(model, opt, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
    assert_equal([p.full_tensor() for p in model], saved["final"],
                 f"adafactor-whole: resumed at {dist.get_world_size()} ranks")
    return "exact"


# -- "load" on 1 or 4 ranks -------------------------------------------------------------------------

def load_checkpoint(name: str, model, opt, out: str) -> None:
    helpers = name in HELPER_CASES
    sd = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt) if helpers else opt.state_dict()}
    dcp.load(sd, checkpoint_id=os.path.join(out, f"ckpt-{name}"))
    model.load_state_dict(sd["model"])
    if helpers:
        set_optimizer_state_dict(model, opt, sd["optim"])
    else:
        opt.load_state_dict(sd["optim"])


def case_load(name: str, out: str) -> str:
    kwargs, aligned = CASES[name]
    saved = torch.load(os.path.join(out, f"ref-{name}.pt"), weights_only=False)
    ref, sharded, opt_ref, opt_sh = new_run(kwargs)
    load_checkpoint(name, sharded, opt_sh, out)
    # The state that came back: exact where the blocks are the same, else within the codec's error.
    layout = json.loads(opt_sh.state_dict()["param_groups"][0]["nibble"]["layout"])
    worst = 0.0
    for (key, state_name), got in full_state(opt_sh).items():
        want = saved["values"][(key, state_name)]
        if torch.equal(got, want):
            continue
        precision = layout[key]["precision"]
        if aligned or precision in ("fp32", "bf16"):
            raise AssertionError(f"state {key}.{state_name} ({precision}) did not come back exactly "
                                 f"(max |diff| {(got - want).abs().max().item()})")
        book = "dynamic_signed" if state_name == "exp_avg" else ("dynamic_unsigned" if precision == "8bit"
                                                                   else "linear_unsigned")
        bound = saved["bounds"][f"{book}_{8 if precision == '8bit' else 4}"] * want.abs().max().item()
        err = (got - want).abs().max().item()
        if err > bound * (1 + 1e-5):
            raise AssertionError(f"state {key}.{state_name}: re-quantized with error {err}, over the codec's bound "
                                 f"{bound}")
        worst = max(worst, err / bound)
    # Training continues, against the run at 2 ranks that was not interrupted.
    train(sharded, opt_sh, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
    got = [p.full_tensor().detach() for p in sharded.parameters()]
    if aligned:
        assert_equal(got, saved["final"], f"{name}: resumed at {dist.get_world_size()} ranks")
        return "exact"
    # Blocks cut differently also step differently from here on (as at any other world size): the
    # weights stay within half of the way they moved in these steps (about 0.03 here; 4-bit lands
    # within 0.35 of it, 8-bit within 0.05).
    for i, (a, b, s0) in enumerate(zip(got, saved["final"], saved["at_save"])):
        diff, moved = (a - b).abs().max().item(), (b - s0).abs().max().item()
        if diff > 0.5 * moved:
            raise AssertionError(f"{name}: parameter {i} resumed {diff} from the uninterrupted run, which moved {moved}")
    return f"within the codec's bound (worst {worst:.2f} of it)"


def main() -> None:
    args = sys.argv[1:]
    phase = args.pop(0)
    where = args.pop(0) if args[0] in ("cpu", "cuda") else "cpu"
    rank, world, store, out = int(args[0]), int(args[1]), args[2], args[3]

    def cases(mesh) -> dict:
        found = {}
        for name in CASES:
            if phase == "save":
                found[f"save-{name}"] = lambda name=name: case_save(name, out)
            else:
                found[f"load-{name}"] = lambda name=name: case_load(name, out)
        if phase == "save":
            found["bad-layouts"] = case_bad_layouts
        if where == "cuda":  # the whole-tensor case builds its model on the CPU
            return found
        if phase == "save":
            found["save-adafactor-whole"] = lambda: case_save_adafactor_whole(mesh, out)
        else:
            found["load-adafactor-whole"] = lambda: case_load_adafactor_whole(mesh, out)
        return found
    run_rank(rank, world, store, os.path.join(out, f"{phase}-rank{rank}.json"), cases, where)


if __name__ == "__main__":
    main()
