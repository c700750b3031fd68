"""One rank of nibble's sharded tests (test_sharded.py starts one process per rank): gloo on the
CPU (or NCCL on one GPU at world size 1, every case but bad input), every case compared with
single-process nibble on the same model, data, seed and device. The
gradients are made identical first: each rank's shard receives the exact slice of the
single-process gradient, so an optimizer bug cannot hide behind reduce-scatter rounding.
Usage: python sharded_worker.py [cpu|cuda] RANK WORLD PORT OUT_DIR"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import nibble
from _helpers import (ALGORITHMS, REPLICATED, SHARDED_PRECISIONS, WHOLE_TENSOR, batch, device, exact_grads,
                      expect_error, full, fully_sharded, library_state, mlp, rows_of, run_rank)

STEPS = 10


def step_both(ref, sharded, opt_ref, opt_sh, step: int, hessian: bool = False, before_step=None) -> None:
    x = batch(step)
    for net in (ref, sharded):
        net.zero_grad()
        net(x).square().mean().backward()
    exact_grads(ref, sharded)
    if before_step is not None:
        before_step(ref, sharded)
    opt_ref.step()
    opt_sh.step()
    if hessian:
        opt_ref.update_hessian()
        opt_sh.update_hessian()


def assert_params_equal(ref: torch.nn.Module, sharded: torch.nn.Module, what: str) -> None:
    for i, (pr, ps) in enumerate(zip(ref.parameters(), sharded.parameters())):
        got = full(ps.detach())
        if not torch.equal(got, pr.detach()):
            diff = (got - pr.detach()).abs().max().item()
            raise AssertionError(f"{what}: parameter {i} differs from single-process nibble (max |diff| {diff})")


def assert_state_equal(opt_ref, opt_sh, ref: torch.nn.Module, sharded: torch.nn.Module, what: str) -> int:
    """Every state tensor of this rank's shards equals the matching slice of the single-process
    state: fp32 values, and for quantized state the codes and the per-block absmax. Returns how many
    tensors had quantized state."""
    mine = library_state(opt_sh)
    theirs = library_state(opt_ref)
    quantized = 0
    for i, (pr, ps) in enumerate(zip(ref.parameters(), sharded.parameters())):
        cols = pr[0].numel() if pr.dim() else 1
        start, rows = rows_of(ps) if ps.placements[0].is_shard() else (0, pr.shape[0] if pr.dim() else 1)
        prefix = f"state.{i}."
        for name, t in mine.items():
            if not name.startswith(prefix):
                continue
            full_state = theirs[name].reshape(-1)
            if name.endswith(".codes"):
                quantized += 1
                per_byte = 2 if t.numel() * 2 == rows * cols or t.numel() * 2 == rows * cols + 1 else 1
                begin, count = start * cols // per_byte, t.numel()
            elif t.dtype == torch.float64:  # per-tensor sums (schedule-free AdamW): alike on every rank
                if rows == 0:
                    continue  # an empty shard never steps, so its sums stay 0
                begin, count = 0, t.numel()
            elif name.endswith(".absmax"):
                block = (rows * cols + t.numel() - 1) // max(t.numel(), 1) if t.numel() else 1
                block = 1 << (block - 1).bit_length()
                begin, count = start * cols // block, t.numel()
            else:
                begin, count = start * cols, t.numel()
            if not torch.equal(t.reshape(-1), full_state[begin:begin + count]):
                raise AssertionError(f"{what}: state {name} of rank {dist.get_rank()} differs from the slice of the "
                                     "single-process state")
    return quantized


def fsdp_pair(cls, kwargs):
    ref = mlp()
    sharded = fully_sharded(ref)
    return ref, sharded, cls(ref.parameters(), **kwargs), cls(sharded.parameters(), **kwargs)


# -- the cases; each returns a short note or raises -------------------------------------------------

def case_algorithm(name: str, precision: str):
    def run() -> str:
        cls, kwargs = ALGORITHMS[name]
        kwargs = dict(kwargs, precision=precision)
        if name in WHOLE_TENSOR and dist.get_world_size() > 1:  # one rank splits nothing
            ref = mlp()
            sharded = copy.deepcopy(ref)
            fully_shard(sharded)
            try:
                cls(sharded.parameters(), **kwargs)
            except ValueError as e:
                if "param.0" not in str(e) or "split across ranks" not in str(e):
                    raise AssertionError(f"the refusal does not name the parameter and why: {e}")
                return "refused"
            raise AssertionError(f"{name} took a split tensor")
        if name == "adafactor":
            # A first moment: the MLP's one quantizable weight is factored, so without it no state
            # of the precision under test would exist (one rank, or the CUDA run, trains it).
            kwargs["beta1"] = 0.9
        ref, sharded, opt_ref, opt_sh = fsdp_pair(cls, kwargs)
        for step in range(STEPS):
            step_both(ref, sharded, opt_ref, opt_sh, step, hessian=name == "sophiag")
        assert_params_equal(ref, sharded, f"{name} {precision}")
        quantized = assert_state_equal(opt_ref, opt_sh, ref, sharded, f"{name} {precision}")
        if precision != "fp32" and quantized == 0:
            raise AssertionError("the 4096-element weight should have quantized state (global min_quant_size)")
        return "equal"
    return run


def replicated_pair(cls, kwargs, mesh, whole_rows: bool):
    """A model whose parameters are replicated DTensors, or (whole_rows) sharded but each held
    whole by one rank (dimension 0 of size 1)."""
    torch.manual_seed(0)
    shapes = [(1, 64), (1, 16)] if whole_rows else [(24, 16), (24,)]
    ref = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(*s).to(device())) for s in shapes])
    placement = Shard(0) if whole_rows else Replicate()
    sharded = torch.nn.ParameterList([torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [placement]))
                                      for p in ref])
    return ref, sharded, cls(ref.parameters(), **kwargs), cls(sharded.parameters(), **kwargs)


def case_whole_tensors(name: str, mesh, whole_rows: bool):
    def run() -> str:
        cls, kwargs = ALGORITHMS[name]
        ref, sharded, opt_ref, opt_sh = replicated_pair(cls, kwargs, mesh, whole_rows)
        for step in range(STEPS):
            gen = torch.Generator().manual_seed(step)
            with torch.no_grad():
                for pr, ps in zip(ref, sharded):
                    pr.grad = torch.randn(pr.shape, generator=gen).to(device())
                    if whole_rows:
                        start, rows = rows_of(ps)
                        local = pr.grad[start:start + rows].clone()
                    else:
                        local = pr.grad.clone()
                    ps.grad = DTensor.from_local(local, mesh, ps.placements, shape=ps.shape, stride=ps.stride())
            opt_ref.step()
            opt_sh.step()
        for i, (pr, ps) in enumerate(zip(ref, sharded)):
            if not torch.equal(full(ps.detach()), pr.detach()):
                raise AssertionError(f"{name}: parameter {i} differs from single-process nibble")
        return "equal"
    return run


def case_mixed_precisions():
    ref, sharded = mlp(), None
    sharded = copy.deepcopy(ref)
    fully_shard(sharded)

    def groups(net):
        params = list(net.parameters())
        return [{"params": params[:2], "precision": "8bit"}, {"params": params[2:3], "precision": "4bit"},
                {"params": params[3:], "precision": "fp32"}]
    opt_ref = nibble.AdamW(groups(ref), lr=1e-2, min_quant_size=0, block_size=32)
    opt_sh = nibble.AdamW(groups(sharded), lr=1e-2, min_quant_size=0, block_size=32)
    for step in range(STEPS):
        step_both(ref, sharded, opt_ref, opt_sh, step)
    # Quantized shards start on a block boundary at block size 32: (128, 32) and (128,) split into
    # 2 or 4 equal pieces, (13, 128) into whole rows of 128 elements.
    assert_params_equal(ref, sharded, "groups at 8bit, 4bit and fp32")
    return "equal"


def case_clipping(mesh):
    ref, sharded, opt_ref, opt_sh = fsdp_pair(nibble.AdamW, dict(lr=1e-2, max_grad_norm=0.05))
    torch_ref = copy.deepcopy(ref)
    opt_torch = nibble.AdamW(torch_ref.parameters(), lr=1e-2)
    for step in range(STEPS):
        torch_ref.zero_grad()
        torch_ref(batch(step)).square().mean().backward()
        norm = torch.nn.utils.clip_grad_norm_(torch_ref.parameters(), 0.05)
        opt_torch.step()
        step_both(ref, sharded, opt_ref, opt_sh, step)
        if abs(opt_sh.last_grad_norm - norm.item()) > 1e-6 * norm.item():
            raise AssertionError(f"step {step}: global norm {opt_sh.last_grad_norm}, clip_grad_norm_ {norm.item()}")
        if norm.item() <= 0.05:
            raise AssertionError("the test should clip")
    assert_params_equal(ref, sharded, "clipping: sharded against single-process nibble")
    for pr, pt in zip(ref.parameters(), torch_ref.parameters()):
        # nibble sums the norm in double, clip_grad_norm_ in float: the clip coefficients may
        # differ in the last float bit, which AdamW's normalised update nearly cancels.
        torch.testing.assert_close(pr, pt, rtol=1e-5, atol=1e-6)
    return "equal"


def case_nan_on_one_rank(mesh):
    ref, sharded, opt_ref, opt_sh = fsdp_pair(nibble.AdamW8bit, dict(lr=1e-2))
    for step in range(3):
        step_both(ref, sharded, opt_ref, opt_sh, step)
    before = [full(p.detach()).clone() for p in sharded.parameters()]
    state_before = library_state(opt_sh)
    x = batch(3)
    sharded.zero_grad()
    sharded(x).square().mean().backward()
    if dist.get_rank() == dist.get_world_size() - 1:
        with torch.no_grad():
            next(iter(sharded.parameters())).grad.to_local().view(-1)[0] = float("nan")
    opt_sh.step()
    after = [full(p.detach()) for p in sharded.parameters()]
    state_after = library_state(opt_sh)
    for i, (a, b) in enumerate(zip(before, after)):
        if not torch.equal(a, b):
            raise AssertionError(f"parameter {i} changed in a step with a NaN gradient on the last rank")
    for name, t in state_before.items():
        if not torch.equal(t, state_after[name]):
            raise AssertionError(f"state {name} changed in a skipped step")
    counters = [None] * dist.get_world_size()
    dist.all_gather_object(counters, opt_sh.counters())
    if any(c != counters[0] for c in counters) or counters[0][0] != (3, 1):
        raise AssertionError(f"counters (steps, skipped) per rank: {counters}")
    return "skipped on every rank"


def case_grad_scaler():
    """torch.amp.GradScaler on FSDP2 parameters: its inf check runs on DTensor gradients,
    which reduce found_inf over the mesh (a max), so an inf in one rank's shard skips the step and
    backs the scale off on every rank. The single-process run gets the same scaled gradients and
    the inf at the same element, so every step, skipped or not, matches it."""
    ref, sharded, opt_ref, opt_sh = fsdp_pair(nibble.AdamW8bit, dict(lr=1e-2))
    scaler_ref, scaler_sh = (torch.amp.GradScaler(device().type, init_scale=2.0 ** 12, growth_interval=3)
                             for _ in range(2))
    inf_step, last = 4, dist.get_world_size() - 1
    weight = next(iter(sharded.parameters()))
    last_start = last * -(-weight.shape[0] // dist.get_world_size())  # the last rank's first row
    scales = []
    for step in range(STEPS):
        x = batch(step)
        for net, scaler in ((ref, scaler_ref), (sharded, scaler_sh)):
            net.zero_grad()
            scaler.scale(net(x).square().mean()).backward()
        exact_grads(ref, sharded)
        if step == inf_step:
            with torch.no_grad():
                next(iter(ref.parameters())).grad[last_start, 0] = float("inf")
                if dist.get_rank() == last:
                    weight.grad.to_local()[0, 0] = float("inf")
            params_before = [full(p.detach()).clone() for p in sharded.parameters()]
            state_before = library_state(opt_sh)
        scaler_ref.step(opt_ref)
        scaler_sh.step(opt_sh)
        scaler_ref.update()
        scaler_sh.update()
        scales.append(scaler_sh.get_scale())
        if scales[-1] != scaler_ref.get_scale():
            raise AssertionError(f"step {step}: scale {scales[-1]}, single process {scaler_ref.get_scale()}")
        if step == inf_step:
            for i, (a, p) in enumerate(zip(params_before, sharded.parameters())):
                if not torch.equal(a, full(p.detach())):
                    raise AssertionError(f"parameter {i} changed in the step with an inf on rank {last}")
            state_after = library_state(opt_sh)
            for name, t in state_before.items():
                if not torch.equal(t, state_after[name]):
                    raise AssertionError(f"state {name} changed in the step with an inf on rank {last}")
            if scales[-1] != scales[-2] / 2:
                raise AssertionError(f"the scale did not back off: {scales[-2]} -> {scales[-1]}")
    assert_params_equal(ref, sharded, "GradScaler")
    assert_state_equal(opt_ref, opt_sh, ref, sharded, "GradScaler")
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (scales, opt_sh.counters()))
    if any(s != seen[0] for s in seen) or seen[0][1] != [(STEPS - 1, 1)] or opt_ref.counters() != [(STEPS - 1, 1)]:
        raise AssertionError(f"(scales, counters) per rank differ or miss the skip: {seen}")
    if max(scales) <= 2.0 ** 12:
        raise AssertionError(f"the scale should also have grown: {scales}")
    return "skipped and backed off on every rank; equal"


def case_ddp():
    from torch.nn.parallel import DistributedDataParallel
    ref = mlp()
    net = DistributedDataParallel(copy.deepcopy(ref))
    opt_ref = nibble.AdamW8bit(ref.parameters(), lr=1e-2, min_quant_size=0)
    opt = nibble.AdamW8bit(net.parameters(), lr=1e-2, min_quant_size=0)
    for step in range(STEPS):
        step_both(ref, net, opt_ref, opt, step)
    assert_params_equal(ref, net.module, "DDP")
    return "equal"


def case_zero():
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel
    ref = mlp()
    net = DistributedDataParallel(copy.deepcopy(ref))
    opt_ref = nibble.AdamW8bit(ref.parameters(), lr=1e-2, min_quant_size=0)
    opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=nibble.AdamW8bit, lr=1e-2, min_quant_size=0)
    for step in range(STEPS):
        step_both(ref, net, opt_ref, opt, step)
    assert_params_equal(ref, net.module, "ZeroRedundancyOptimizer")
    return "equal"


def case_zero_resume():
    """ZeroRedundancyOptimizer over nibble: consolidate_state_dict(to=0) and state_dict() on rank
    0, torch.save, then a fresh ZeRO optimizer loads it on every rank and trains on bit-identical
    to the uninterrupted run (parameters, each rank's nibble state and step counters). Two groups,
    8-bit and fp32, so that each rank's local optimizer maps ZeRO's global indices to its own."""
    import io
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    def make(model):
        net = DistributedDataParallel(copy.deepcopy(model))
        params = list(net.module.parameters())
        groups = [{"params": params[0::2]}, {"params": params[1::2], "precision": "fp32"}]
        return net, ZeroRedundancyOptimizer(groups, optimizer_class=nibble.AdamW8bit, lr=1e-2, min_quant_size=0)

    def train(net, opt, steps):
        for step in steps:
            net.zero_grad()
            net(batch(step)).square().mean().backward()
            opt.step()

    half = STEPS // 2
    net, opt = make(mlp())
    train(net, opt, range(half))
    opt.consolidate_state_dict(to=0)
    blob = [None]
    if dist.get_rank() == 0:
        buffer = io.BytesIO()
        torch.save({"model": net.module.state_dict(), "optim": opt.state_dict()}, buffer)
        blob[0] = buffer.getvalue()
    dist.broadcast_object_list(blob, src=0)
    train(net, opt, range(half, STEPS))

    saved = torch.load(io.BytesIO(blob[0]))
    model = mlp()
    model.load_state_dict(saved["model"])
    net2, opt2 = make(model)
    opt2.load_state_dict(saved["optim"])
    train(net2, opt2, range(half, STEPS))
    assert_params_equal(net.module, net2.module, "ZeRO resumed against uninterrupted")
    if sorted(opt.optim._groups) != sorted(opt2.optim._groups):
        raise AssertionError(f"groups with state: {sorted(opt.optim._groups)} and {sorted(opt2.optim._groups)}")
    quantized = 0
    for index in opt.optim._groups:
        mine = library_state(opt.optim, index)
        theirs = library_state(opt2.optim, index)
        for name, t in mine.items():
            quantized += name.endswith(".codes")
            if not torch.equal(t, theirs[name]):
                raise AssertionError(f"state {name} of group {index} differs after the resume on rank "
                                     f"{dist.get_rank()}")
    if opt.optim.counters() != opt2.optim.counters():
        raise AssertionError(f"counters {opt.optim.counters()} uninterrupted, {opt2.optim.counters()} resumed")
    held = [0] * dist.get_world_size()
    dist.all_gather_object(held, quantized)
    if sum(held) == 0:
        raise AssertionError("no rank held 8-bit state to resume")
    return "equal"


def case_bad_input(mesh):
    other = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("other",))
    a = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
    b = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), other, [Shard(0)]))
    plain = torch.nn.Parameter(torch.randn(8, 4))
    expect_error(ValueError, ["parameter 1", "mesh"], lambda: nibble.AdamW([a, b]))
    expect_error(ValueError, ["mixes DTensor", "parameter 1"], lambda: nibble.AdamW([a, plain]))
    opt = nibble.AdamW([a])
    expect_error(ValueError, ["mesh"], lambda: opt.add_param_group({"params": [b]}))
    if len(opt.param_groups) != 1:
        raise AssertionError("a refused add_param_group left a group behind")
    opt.state[a] = {"step": torch.tensor(1.0)}  # how ZeroRedundancyOptimizer hands state over
    expect_error(ValueError, ["sharded", "load_state_dict"], opt.state_dict)
    opt.state.clear()
    opt.add_param_group({"params": [plain]})  # plain tensors in a group of their own: replicated
    state = opt.state_dict()["state"]
    if not isinstance(state[0]["exp_avg"], DTensor) or isinstance(state[1]["exp_avg"], DTensor):
        raise AssertionError("a sharded state_dict holds DTensor state for DTensor parameters, plain for plain ones")
    return "refused"


def cases(mesh, world: int) -> dict:
    out = {}
    for name in ALGORITHMS:
        for precision in SHARDED_PRECISIONS:
            out[f"fsdp-{name}-{precision}"] = case_algorithm(name, precision)
    for name in REPLICATED:
        out[f"replicated-{name}"] = case_whole_tensors(name, mesh, False)
        out[f"whole-rows-{name}"] = case_whole_tensors(name, mesh, True)
    out["mixed-precisions"] = case_mixed_precisions
    out["clipping"] = lambda: case_clipping(mesh)
    out["nan-on-one-rank"] = lambda: case_nan_on_one_rank(mesh)
    out["grad-scaler"] = case_grad_scaler
    out["ddp"] = case_ddp
    out["zero"] = case_zero
    out["zero-resume"] = case_zero_resume
    if device().type == "cpu":  # it builds meshes of its own, on the CPU
        out["bad-input"] = lambda: case_bad_input(mesh)
    return out


def main() -> None:
    args = sys.argv[1:]
    where = args.pop(0) if args[0] in ("cpu", "cuda") else "cpu"
    rank, world, store, out_dir = int(args[0]), int(args[1]), args[2], args[3]
    run_rank(rank, world, store, os.path.join(out_dir, f"rank{rank}.json"), lambda mesh: cases(mesh, world), where)


if __name__ == "__main__":
    main()
