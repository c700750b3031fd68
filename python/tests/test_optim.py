"""nibble's PyTorch optimizers on CPU tensors: against torch.optim where the algorithm is the same,
against nibble's C library called directly, quantized state against fp32 within error budgets,
state_dict round trips, LR schedulers, GradScaler, and bad arguments. CUDA variants run only where
a GPU is visible."""
from __future__ import annotations

import collections
import copy
import ctypes
import io
import json
import math
import warnings

import pytest
import torch

import nibble
from _helpers import ALGORITHMS
from nibble import _lib

CUDA = nibble.cuda_available() and torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
ALL = [cls for cls, _ in ALGORITHMS.values()]


def model(seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 129), torch.nn.GELU(), torch.nn.Linear(129, 7)).to(device)


def train(net: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1, scheduler=None) -> None:
    gen = torch.Generator().manual_seed(seed)
    device = next(net.parameters()).device
    for _ in range(steps):
        x = torch.randn(16, 32, generator=gen).to(device)
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


# PyTorch's own fp32 tolerances for comparing optimizer implementations (test_optim.py), 5x for a
# different implementation of the same update.
RTOL, ATOL = 5 * 1.3e-6, 5 * 1e-5


def assert_close_models(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


def assert_same_models(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every parameter of a equals b's bit for bit."""
    for i, (p, q) in enumerate(zip(a.parameters(), b.parameters())):
        assert torch.equal(p, q), f"parameter {i} differs"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ours,theirs,kwargs", [
    (nibble.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (nibble.AdamW, torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
    (nibble.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.01)),
    (nibble.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    (nibble.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (nibble.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, maximize=True)),
    # RAdam's first five steps are unrectified (rho_t <= 5), the rest rectified.
    (nibble.RAdam, torch.optim.RAdam, dict(lr=1e-2, weight_decay=0.01)),
    (nibble.RAdam, torch.optim.RAdam, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, decoupled_weight_decay=True,
                                           maximize=True)),
])
def test_fp32_matches_torch_optim(device, ours, theirs, kwargs):
    assert_trains_alike(device, ours, theirs, kwargs)


def assert_trains_alike(device: str, ours: type, theirs: type, kwargs: dict) -> None:
    """20 steps of the same training with both optimizers end at the same parameters, moved."""
    a, b = model(device=device), model(device=device)
    train(a, ours(a.parameters(), **kwargs), 20)
    train(b, theirs(b.parameters(), **kwargs), 20)
    assert_close_models(a, b)
    assert max_diff(a, model(device=device)) > 1e-3, "the run did not move the parameters"


def raw_step(cls, precision: str, steps: int) -> list[torch.Tensor]:
    """The same training run through nibble's C library directly, without the torch class."""
    net = model()
    params = list(net.parameters())
    probe = cls(params, precision=precision, min_quant_size=0)
    options = probe._options(probe.param_groups[0], torch.device("cpu"))
    lr = probe._lr(probe.param_groups[0])
    structs = (_lib.NibbleParam * len(params))()
    shapes = []
    for i, p in enumerate(params):
        shapes.append((ctypes.c_int64 * p.dim())(*p.shape))
        structs[i] = _lib.NibbleParam(f"param.{i}".encode(), p.dim(), shapes[-1], p.data_ptr(), None, 0, 0)
    handle = ctypes.c_void_p()
    _lib.check(_lib.lib.nibble_create(json.dumps(options).encode(), structs, len(params), ctypes.byref(handle)))
    gen = torch.Generator().manual_seed(1)
    try:
        for _ in range(steps):
            x = torch.randn(16, 32, generator=gen)
            for p in params:
                p.grad = None
            net(x).square().mean().backward()
            grads = (ctypes.c_void_p * len(params))(*[p.grad.data_ptr() for p in params])
            _lib.check(_lib.lib.nibble_set_grads(handle, grads, len(params), None))
            _lib.check(_lib.lib.nibble_step(handle, 1.0, float(lr), 0, None, None, None, None))
    finally:
        _lib.lib.nibble_destroy(handle)
    return [p.detach().clone() for p in params]


class PlainADOPT(torch.optim.Optimizer):
    """ADOPT as its authors' code steps it (iShohei220/adopt), written out in torch for this test."""

    def __init__(self, params, lr, betas, eps, weight_decay, decouple, clip_exponent):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decouple=decouple,
                                      clip_exponent=clip_exponent))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                s = self.state[p]
                if not s:
                    s.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                grad = p.grad if g["decouple"] else p.grad + g["weight_decay"] * p
                if s["step"] == 0:
                    s["v"].addcmul_(grad, grad)
                else:
                    if g["decouple"]:
                        p.mul_(1 - g["lr"] * g["weight_decay"])
                    n = grad / s["v"].sqrt().clamp(min=g["eps"])
                    if g["clip_exponent"] is not None:
                        c = s["step"] ** g["clip_exponent"]
                        n.clamp_(-c, c)
                    s["m"].lerp_(n, 1 - b1)
                    p.add_(s["m"], alpha=-g["lr"])
                    s["v"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                s["step"] += 1


class PlainAdEMAMix(torch.optim.Optimizer):
    """AdEMAMix as its authors' code steps it (apple/ml-ademamix), written out in torch for this test."""

    def __init__(self, params, lr, betas, alpha, alpha_warmup, beta3_warmup, eps, weight_decay):
        super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha, alpha_warmup=alpha_warmup,
                                      beta3_warmup=beta3_warmup, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        half_life = lambda beta: math.log(0.5) / math.log(beta + 1e-8) - 1
        for g in self.param_groups:
            b1, b2, b3_final = g["betas"]
            for p in g["params"]:
                s = self.state[p]
                if not s:
                    s.update(step=0, m=torch.zeros_like(p), slow=torch.zeros_like(p), v=torch.zeros_like(p))
                s["step"] += 1
                t = s["step"]
                alpha, b3 = g["alpha"], b3_final
                if g["alpha_warmup"] and t < g["alpha_warmup"]:
                    alpha = t / g["alpha_warmup"] * g["alpha"]
                if g["beta3_warmup"] and t < g["beta3_warmup"]:
                    a = t / g["beta3_warmup"]
                    b3 = 0.5 ** (1 / ((1 - a) * half_life(b1) + a * half_life(b3_final) + 1))
                s["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                s["slow"].mul_(b3).add_(p.grad, alpha=1 - b3)
                s["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (s["v"].sqrt() / math.sqrt(1 - b2 ** t)).add_(g["eps"])
                update = (s["m"] / (1 - b1 ** t) + alpha * s["slow"]) / denom
                p.add_(update + g["weight_decay"] * p, alpha=-g["lr"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ours,theirs,kwargs", [
    (nibble.ADOPT, PlainADOPT, dict(lr=1e-2, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.01, decouple=False,
                                    clip_exponent=0.25)),
    # Unclipped ADOPT divides by the first step's |g|: eps 1e-3 keeps near-zero gradients from blowing up.
    (nibble.ADOPT, PlainADOPT, dict(lr=1e-3, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1, decouple=True,
                                    clip_exponent=None)),
    (nibble.AdEMAMix, PlainAdEMAMix, dict(lr=1e-2, betas=(0.9, 0.999, 0.9999), alpha=2.0, alpha_warmup=None,
                                          beta3_warmup=None, eps=1e-8, weight_decay=0.01)),
    (nibble.AdEMAMix, PlainAdEMAMix, dict(lr=5e-3, betas=(0.9, 0.999, 0.999), alpha=5.0, alpha_warmup=12,
                                          beta3_warmup=15, eps=1e-8, weight_decay=0.1)),
])
def test_fp32_matches_the_authors_update(device, ours, theirs, kwargs):
    """ADOPT and AdEMAMix against their authors' updates written plainly in torch, 20 steps."""
    assert_trains_alike(device, ours, theirs, kwargs)


class PlainMuon(torch.optim.Optimizer):
    """torch.optim.Muon's math (torch/optim/_muon.py) written out with its Newton-Schulz iteration in
    `dtype` (torch runs it in bf16; nibble's CPU backend in fp32)."""

    def __init__(self, params, lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn,
                 dtype=torch.float32):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                                      adjust_lr_fn=adjust_lr_fn))
        self.dtype = dtype

    def newton_schulz(self, g, coefficients, steps, eps):
        a, b, c = coefficients
        x = g.to(self.dtype)
        tall = g.size(0) > g.size(1)
        if tall:
            x = x.T
        x = x / x.norm().clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return (x.T if tall else x).to(g.dtype)

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - g["momentum"])
                update = p.grad.lerp(buf, g["momentum"]) if g["nesterov"] else buf
                o = self.newton_schulz(update.reshape(p.shape[0], -1), g["ns_coefficients"], g["ns_steps"], g["eps"])
                A, B = p.shape[0], p[0].numel()
                factor = {"original": math.sqrt(max(1, A / B)), "match_rms_adamw": 0.2 * math.sqrt(max(A, B)),
                          "spectral_unclamped": math.sqrt(A / B)}[g["adjust_lr_fn"] or "original"]
                p.mul_(1 - g["lr"] * g["weight_decay"])
                p.add_(o.reshape(p.shape), alpha=-g["lr"] * factor)


MUON = dict(lr=2e-2, weight_decay=0.1, momentum=0.95, nesterov=True, ns_coefficients=(3.4445, -4.7750, 2.0315),
            eps=1e-7, ns_steps=5, adjust_lr_fn=None)


def train_pair(net, opts, scheds, steps):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 32, generator=gen)
        for o in opts:
            o.zero_grad()
        net(x).square().mean().backward()
        for o in opts:
            o.step()
        for s in scheds:
            s.step()


@pytest.mark.parametrize("kwargs", [
    MUON,
    dict(MUON, nesterov=False, momentum=0.9, adjust_lr_fn="match_rms_adamw", weight_decay=0.01, lr=1e-3),
    dict(MUON, adjust_lr_fn="spectral_unclamped", ns_steps=3, ns_coefficients=(2.0, -1.5, 0.5), eps=1e-5),
])
def test_muon_matches_torch_muons_math_and_adamw_on_the_rest(kwargs):
    """nibble.Muon over the whole model (weights orthogonalised, biases by its AdamW fallback) against
    torch.optim.Muon's math with fp32 Newton-Schulz on the weights and torch.optim.AdamW on the
    biases, 20 steps under one StepLR schedule each (lr_scale scales both lrs)."""
    adamw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.05)
    a, b = model(), model()
    ours = nibble.Muon(a.parameters(), **kwargs, adamw_lr=adamw["lr"], adamw_betas=adamw["betas"],
                       adamw_eps=adamw["eps"], adamw_weight_decay=adamw["weight_decay"])
    plain = PlainMuon([p for p in b.parameters() if p.dim() >= 2], **kwargs)
    torch_adamw = torch.optim.AdamW([p for p in b.parameters() if p.dim() < 2], **adamw)
    scheds_a = [torch.optim.lr_scheduler.StepLR(ours, step_size=7, gamma=0.5)]
    scheds_b = [torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5) for o in (plain, torch_adamw)]
    train_pair(a, [ours], scheds_a, 20)
    train_pair(b, [plain, torch_adamw], scheds_b, 20)
    assert_close_models(a, b)
    assert max_diff(a, model()) > 1e-3, "the run did not move the parameters"


# torch.optim.Muon runs Newton-Schulz in bf16 (8 significant bits): each orthogonalised update
# differs from nibble's fp32 one by ~2^-8 relative and more where the quintic amplifies it, and the
# trajectories drift apart through the gradients. Measured over 20 steps: the largest parameter
# difference is 1.9% of the largest distance torch's run moved a parameter; bound 5%, while the
# update is 100% (a missing or doubled step, a wrong shape factor would be tens of percent).
def test_muon_follows_torch_optim_muon_within_its_bf16_rounding():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(32, 129, bias=False), torch.nn.GELU(), torch.nn.Linear(129, 7, bias=False))
    b, start = copy.deepcopy(a), copy.deepcopy(a)
    ours = nibble.Muon(a.parameters(), **MUON)
    theirs = torch.optim.Muon(b.parameters(), **MUON)
    train_pair(a, [ours], [], 20)
    train_pair(b, [theirs], [], 20)
    moved = max_diff(b, start)
    assert moved > 1e-2
    assert max_diff(a, b) < 0.05 * moved, f"nibble vs torch.optim.Muon: {max_diff(a, b):.3g} of {moved:.3g} moved"


def test_muon_groups_choose_muon_or_adamw():
    """use_muon False: the group is AdamW's (its lr, weight_decay, adamw_betas, adamw_eps), as in
    MuonWithAuxAdam; True: every parameter orthogonalised, a vector refused."""
    a, b = model(), model()
    wa = [a[0].weight, a[2].weight]
    ours = nibble.Muon([dict(params=wa, use_muon=True),
                        dict(params=[a[0].bias, a[2].bias], use_muon=False, lr=5e-3,
                             weight_decay=0.02)], **MUON, adamw_betas=(0.9, 0.95), adamw_eps=1e-10)
    plain = PlainMuon([b[0].weight, b[2].weight], **MUON)
    torch_adamw = torch.optim.AdamW([b[0].bias, b[2].bias], lr=5e-3, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.02)
    train_pair(a, [ours], [], 15)
    train_pair(b, [plain, torch_adamw], [], 15)
    assert_close_models(a, b)
    names = [sorted(e) for e in ours.state_dict()["state"].values()]
    assert names == [["momentum_buffer", "step"]] * 2 + [["exp_avg", "exp_avg_sq", "step"]] * 2
    net = model()
    with pytest.raises(ValueError, match="parameter 'param.1' has rank 1: use_muon true orthogonalises every tensor"):
        train(net, nibble.Muon(net.parameters(), use_muon=True), 1)


def test_muon_fallback_lr_resumes_after_an_lr_changed_by_hand():
    # adamw_lr scales with lr relative to the group's base lr, which the state_dict keeps: a resume
    # after a manual decay steps the AdamW fallback tensors as the uninterrupted run does.
    a, b = model(), model()
    opt_a = nibble.Muon(a.parameters(), lr=2e-2, adamw_lr=1e-2)
    train(a, opt_a, 2)
    opt_a.param_groups[0]["lr"] = 1e-2
    train(a, opt_a, 1)
    state = copy.deepcopy(opt_a.state_dict())
    assert state["param_groups"][0]["muon_base_lr"] == 2e-2
    b.load_state_dict(a.state_dict())
    opt_b = nibble.Muon(b.parameters(), lr=1e-2, adamw_lr=1e-2)
    opt_b.load_state_dict(state)
    train(a, opt_a, 2, seed=3)
    train(b, opt_b, 2, seed=3)
    assert_same_models(a, b)


def test_muon_state_dict_round_trip_continues_in_lockstep():
    a, b = model(), model()
    opt_a = nibble.Muon8bit(a.parameters(), lr=2e-2, adamw_lr=1e-2, min_quant_size=0)
    train(a, opt_a, 8)
    state = copy.deepcopy(opt_a.state_dict())
    assert state["state"][0]["momentum_buffer.codes"].dtype == torch.uint8
    assert "exp_avg_sq.codes" in state["state"][1]
    b.load_state_dict(a.state_dict())
    opt_b = nibble.Muon8bit(b.parameters(), lr=2e-2, adamw_lr=1e-2, min_quant_size=0)
    opt_b.load_state_dict(state)
    train(a, opt_a, 5, seed=3)
    train(b, opt_b, 5, seed=3)
    assert_same_models(a, b)


@pytest.mark.parametrize("make,match", [
    (lambda p: nibble.Muon(p, ns_steps=0), r"muon: ns_steps must be an integer in \[1, 99\], got 0"),
    (lambda p: nibble.Muon(p, ns_steps=100), r"ns_steps must be an integer in \[1, 99\], got 100"),
    (lambda p: nibble.Muon(p, ns_steps=2.5), "ns_steps must be an integer, got 2.5"),
    (lambda p: nibble.Muon(p, adjust_lr_fn="adamw"), "adjust_lr must be one of original, match_rms_adamw, "
                                                      "spectral_unclamped, got 'adamw'"),
    (lambda p: nibble.Muon(p, eps=float("nan")), "eps must be finite"),
    (lambda p: nibble.Muon(p, ns_coefficients=(1.0, 2.0)), "ns_coefficients must be three numbers"),
    (lambda p: nibble.Muon(p, adamw_betas=(1.0, 0.9)), r"adamw_betas\[0\]"),
    (lambda p: nibble.Muon(p, momentum=1.5), "momentum"),
    (lambda p: nibble.Muon(p, lr=0.0), "needs a base lr > 0"),
])
def test_muon_bad_arguments_raise_value_error_naming_them(make, match):
    with pytest.raises(ValueError, match=match):
        make(model().parameters())


@pytest.mark.parametrize("call", ["nibble_set_grads", "nibble_update_hessian"])
def test_calls_taking_a_stream_refuse_one_for_a_cpu_optimizer(call):
    # On CUDA the step hands torch's current stream to nibble_set_grads (the gradient table is
    # uploaded on the stream the step is queued on) and SophiaG's update_hessian to
    # nibble_update_hessian (the stream that computed the estimates); a CPU optimizer has none.
    net = model()
    params = list(net.parameters())
    opt = nibble.SophiaG(params)
    train(net, opt, 1)
    made = opt._groups[0]
    pointers = (ctypes.c_void_p * len(params))(*[p.grad.data_ptr() for p in params])
    fn = getattr(_lib.lib, call)
    with pytest.raises(ValueError, match=f"{call}: a stream was given to an optimizer on the CPU"):
        _lib.check(fn(made.handle, pointers, len(params), ctypes.c_void_p(0x1000)))
    before = [p.detach().clone() for p in params]
    _lib.check(fn(made.handle, pointers, len(params), None))
    assert all(torch.equal(p.detach(), q) for p, q in zip(params, before))


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit", "4bit", "fp8"])
def test_every_class_and_precision_equals_the_library(cls, precision):
    net = model()
    opt = cls(net.parameters(), precision=precision, min_quant_size=0)
    train(net, opt, 6)
    assert opt.counters() == [(6, 0)]
    for p, q in zip(net.parameters(), raw_step(cls, precision, 6)):
        assert torch.isfinite(p).all()
        assert torch.equal(p.detach(), q), f"{cls.__name__} {precision} differs from the C library's step"


# Quantized state against fp32 after 50 AdamW steps (lr 1e-3) on this small model, every tensor
# quantized (min_quant_size=0): the mean parameter difference as a fraction of the mean distance
# the fp32 run moved. Measured 0.25% (bf16), 2.1% (8-bit), 27% (4-bit: 16 codes, biases
# quantized too) and 4.0% (fp8: 8 codes per octave); the budgets are about twice that.
@pytest.mark.parametrize("precision,budget", [("bf16", 0.005), ("8bit", 0.05), ("4bit", 0.5), ("fp8", 0.08)])
def test_quantized_state_stays_within_budget_of_fp32(precision, budget):
    start, full, low = model(), model(), model()
    train(full, nibble.AdamW(full.parameters(), lr=1e-3, min_quant_size=0), 50)
    train(low, nibble.AdamW(low.parameters(), lr=1e-3, precision=precision, min_quant_size=0), 50)
    mean_abs = lambda a, b: torch.cat([(p - q).abs().flatten() for p, q in zip(a.parameters(), b.parameters())]).mean().item()  # noqa: E731
    moved, error = mean_abs(full, start), mean_abs(full, low)
    assert error < budget * moved, f"{precision}: mean |p - p_fp32| = {error:.3g}, {error / moved:.1%} of the distance moved"
    assert error > 0.0, "the quantized run must differ from fp32 at all (else the test compares nothing)"


def test_aliases_default_to_their_precision():
    net = model()
    assert nibble.AdamW8bit(net.parameters()).param_groups[0]["precision"] == "8bit"
    assert nibble.AdamW4bit(net.parameters()).param_groups[0]["precision"] == "4bit"
    assert nibble.Adam8bit(net.parameters()).param_groups[0]["precision"] == "8bit"
    assert nibble.Lion8bit(net.parameters()).param_groups[0]["precision"] == "8bit"
    assert issubclass(nibble.AdamW8bit, nibble.AdamW)
    assert nibble.AdamWFp8(net.parameters()).param_groups[0]["precision"] == "fp8"
    assert nibble.AdamFp8(net.parameters()).param_groups[0]["precision"] == "fp8"
    assert nibble.LionFp8(net.parameters()).param_groups[0]["precision"] == "fp8"
    assert nibble.AdEMAMixFp8(net.parameters()).param_groups[0]["precision"] == "fp8"
    assert issubclass(nibble.AdamWFp8, nibble.AdamW)


def test_state_bytes_shrink_with_precision():
    net = model()
    sizes = {}
    for precision in ("fp32", "bf16", "8bit", "4bit", "fp8"):
        opt = nibble.AdamW(net.parameters(), precision=precision, min_quant_size=0)
        sizes[precision] = opt.state_bytes()
    params = sum(p.numel() for p in net.parameters())
    assert sizes["fp32"] == 8 * params
    assert sizes["fp32"] > sizes["bf16"] > sizes["8bit"] > sizes["4bit"]
    assert sizes["fp8"] == sizes["8bit"]  # a code per byte and a scale per block, like 8bit


@pytest.mark.parametrize("precision", ["fp32", "8bit", "4bit", "fp8"])
def test_state_dict_round_trip_continues_in_lockstep(precision, tmp_path):
    a, b = model(), model()
    opt_a = nibble.AdamW(a.parameters(), lr=1e-2, precision=precision, min_quant_size=0)
    train(a, opt_a, 10)
    state = opt_a.state_dict()
    entry = state["state"][0]
    if precision == "fp32":
        assert entry["exp_avg"].shape == a[0].weight.shape
    else:
        assert entry["exp_avg.codes"].dtype == torch.uint8
        assert entry["exp_avg.absmax"].dtype == torch.float32
    assert entry["step"].item() == 10
    path = tmp_path / "opt.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    b.load_state_dict(a.state_dict())
    opt_b = nibble.AdamW(b.parameters(), lr=1e-2, precision=precision, min_quant_size=0)
    opt_b.load_state_dict(loaded)
    assert opt_b.counters() == [(10, 0)]
    train(a, opt_a, 10, seed=5)
    train(b, opt_b, 10, seed=5)
    assert_same_models(a, b)


def test_state_dict_of_another_shape_is_refused_and_leaves_the_state():
    a = model()
    opt = nibble.AdamW(a.parameters(), min_quant_size=0)
    train(a, opt, 2)
    before = opt.state_dict()
    other = torch.nn.Linear(5, 5)
    wrong = nibble.AdamW(other.parameters(), min_quant_size=0)
    with pytest.raises(ValueError, match="parameter"):
        opt.load_state_dict(wrong.state_dict())
    after = opt.state_dict()
    assert torch.equal(before["state"][0]["exp_avg"], after["state"][0]["exp_avg"])


def test_state_assigned_per_parameter_is_loaded_before_the_next_step():
    """torch's ZeroRedundancyOptimizer restores state by assigning state_dict()'s per-parameter
    entries to optimizer.state[param]; here two of four, so the other two keep their own state."""
    a, b = model(), model()
    opt_a = nibble.AdamW8bit(a.parameters(), lr=1e-2, min_quant_size=0)
    opt_b = nibble.AdamW8bit(b.parameters(), lr=1e-2, min_quant_size=0)
    train(a, opt_a, 6)
    train(b, opt_b, 3)
    b.load_state_dict(a.state_dict())
    saved = opt_a.state_dict()["state"]
    params = list(b.parameters())
    opt_b.state[params[0]] = saved[0]
    opt_b.state[params[2]] = saved[2]
    kept = opt_b._state_dict()["state"][1]
    assert opt_b.counters() == [(6, 0)]  # the group's count follows the largest loaded step
    assert len(opt_b.state) == 0
    assert torch.equal(opt_b.state_dict()["state"][1]["exp_avg.codes"], kept["exp_avg.codes"])
    opt_b.state[params[1]] = saved[1]
    opt_b.state[params[3]] = saved[3]
    train(a, opt_a, 4, seed=5)
    train(b, opt_b, 4, seed=5)
    assert_same_models(a, b)


def test_state_assigned_that_does_not_fit_is_refused_at_every_step():
    net = model()
    opt = nibble.AdamW8bit(net.parameters(), min_quant_size=0)
    train(net, opt, 1)
    opt.state[torch.nn.Parameter(torch.zeros(3))] = opt.state_dict()["state"][0]
    with pytest.raises(ValueError, match=r"\(3,\).*not a parameter"):
        opt.step()
    opt.state.clear()
    first = next(net.parameters())
    before = first.detach().clone()
    opt.state[first] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(first.shape)}
    for _ in range(2):
        with pytest.raises(ValueError, match="exp_avg.codes"):
            opt.step()
    assert torch.equal(first, before)


def test_lr_scheduler_changes_the_step_like_torch():
    a, b = model(), model()
    opt_a = nibble.AdamW(a.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    train(a, opt_a, 12, scheduler=torch.optim.lr_scheduler.StepLR(opt_a, step_size=3, gamma=0.5))
    train(b, opt_b, 12, scheduler=torch.optim.lr_scheduler.StepLR(opt_b, step_size=3, gamma=0.5))
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] == pytest.approx(1e-2 / 16)
    assert_close_models(a, b)


def test_grad_scaler_unscales_in_the_step_and_skips_inf():
    a, b = model(), model()
    opt_a = nibble.AdamW(a.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    scaler_a = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler_b = torch.amp.GradScaler("cpu", init_scale=1024.0)
    gen = torch.Generator().manual_seed(3)
    for step in range(6):
        x = torch.randn(16, 32, generator=gen)
        for net, opt, scaler in ((a, opt_a, scaler_a), (b, opt_b, scaler_b)):
            opt.zero_grad()
            scaler.scale(net(x).square().mean()).backward()
            if step == 3:
                next(net.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
    assert opt_a.counters() == [(5, 1)]
    assert scaler_a.get_scale() == scaler_b.get_scale() == 512.0
    assert_close_models(a, b)


@pytest.mark.parametrize("make,match", [
    (lambda p: nibble.AdamW(p, lr=-1.0), "lr"),
    (lambda p: nibble.AdamW(p, betas=(1.0, 0.9)), r"betas\[0\]"),
    (lambda p: nibble.AdamW(p, betas=0.9), "betas"),
    (lambda p: nibble.AdamW(p, eps=-1e-8), "eps"),
    (lambda p: nibble.AdamW(p, weight_decay=-0.1), "weight_decay"),
    (lambda p: nibble.AdamW(p, precision="3bit"), "precision"),
    (lambda p: nibble.AdamW(p, block_size=100), "block_size"),
    (lambda p: nibble.AdamW(p, min_quant_size=-1), "min_quant_size"),
    (lambda p: nibble.SGD(p, momentum=-0.5), "momentum"),
    (lambda p: nibble.SGD(p, nesterov=True), "nesterov"),
    (lambda p: nibble.Adafactor(p, lr=1e-3), "relative_step"),
    (lambda p: nibble.QHM(p, nu=2.0), "nu"),
    (lambda p: nibble.SophiaG(p, rho=-1.0), "rho"),
    (lambda p: nibble.AdamW(p, check_finite=1), "check_finite must be True or False, got 1"),
])
def test_bad_arguments_raise_value_error_naming_them(make, match):
    with pytest.raises(ValueError, match=match):
        make(model().parameters())


@pytest.mark.parametrize("cls", [nibble.AdamW, nibble.AdamW8bit], ids=lambda c: c.__name__)
def test_check_finite_skips_a_nan_gradient_and_off_steps_through_it_as_torch(cls):
    """By default a NaN gradient skips the step (parameters and state unchanged); check_finite=False
    drops the gradient pre-pass and steps it as torch.optim does, the NaN reaching the parameter."""
    for check in (True, False):
        net = model()
        opt = cls(net.parameters(), check_finite=check, min_quant_size=0)
        train(net, opt, 2)
        before = [p.detach().clone() for p in net.parameters()]
        state = copy.deepcopy(opt.state_dict()["state"])
        net(torch.randn(4, 32)).square().mean().backward()
        first = next(net.parameters())
        first.grad[0, 0] = float("nan")
        opt.step()
        if check:
            assert opt.counters() == [(2, 1)]
            assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
            after = opt.state_dict()["state"]
            assert all(torch.equal(after[i][k], v) for i in state for k, v in state[i].items())
        else:
            assert opt.counters() == [(3, 0)]
            assert torch.isnan(first[0, 0]) and not torch.isnan(first[0, 1])
            assert torch.isfinite(list(net.parameters())[-1]).all()


def test_every_algorithm_of_the_library_has_a_class_and_the_same_precisions():
    tables = _lib.tables()
    library = {a["name"] for a in tables["algorithms"]}
    assert library == set(ALGORITHMS), "a library algorithm without a Python class, or the reverse"
    assert nibble.optim.PRECISIONS == tuple(tables["precisions"])
    for entry in tables["algorithms"]:
        for name in [u["name"] for u in entry["numbers"]] + entry["flags"]:
            assert name in entry["defaults"], f"{entry['name']} reads {name}, which has no default"


def test_options_are_checked_without_parameters():
    check = lambda options: _lib.check(_lib.lib.nibble_check_options(json.dumps(options).encode()))
    check({"algorithm": "adamw", "precision": "8bit", "hyper": {"lr": 1e-3}})
    with pytest.raises(ValueError, match=r"adamw: beta2 must be in \[0, 1\), got 1.5"):
        check({"algorithm": "adamw", "hyper": {"beta2": 1.5}})
    with pytest.raises(ValueError, match="block_size must be a power of two in \\[16, 4096\\], got 100"):
        check({"algorithm": "lion", "block_size": 100})
    with pytest.raises(ValueError, match="hyper.betas is not a nibble hyperparameter"):
        check({"algorithm": "sgd", "hyper": {"betas": 0.9}})


@pytest.mark.parametrize("options,match", [
    ({"precision": "8bit", "block_size": 16.9}, "option block_size must be a whole number, got 16.9"),
    ({"precision": "8bit", "block_size": 2 ** 32 + 256}, "option block_size is out of range .*: 4294967552"),
    ({"seed": -1}, r"option seed is out of range \[0, 18446744073709551615\]: -1"),
    ({"min_quant_size": 4096.5}, "option min_quant_size must be a whole number, got 4096.5"),
    ({"check_finite": 1}, "option check_finite must be true or false, got 1"),
    ({"max_grad_norm": "1"}, 'option max_grad_norm must be a number, got "1"'),
])
def test_option_numbers_are_taken_only_as_given(options, match):
    # JSON numbers are not narrowed, truncated or wrapped into another value than the one given.
    with pytest.raises(ValueError, match=match):
        _lib.check(_lib.lib.nibble_check_options(json.dumps(dict(options, algorithm="adamw")).encode()))


def test_step_scalars_and_counts_the_library_cannot_use_are_refused():
    net = model()
    params = list(net.parameters())
    opt = nibble.AdamW(params)
    train(net, opt, 1)
    handle = opt._groups[0].handle
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="grad_scale must be finite and > 0 with a finite inverse, got 1e-45"):
        _lib.check(_lib.lib.nibble_step(handle, ctypes.c_float(1e-45), 1.0, 0, None, None, None, None))
    with pytest.raises(ValueError, match="nibble_step: a stream was given to an optimizer on the CPU"):
        _lib.check(_lib.lib.nibble_step(handle, 1.0, 1.0, 0, ctypes.c_void_p(0x1000), None, None, None))
    with pytest.raises(ValueError, match="grad_square_sum must be >= 0 .*, got -1"):
        _lib.check(_lib.lib.nibble_step_with_square_sum(handle, 1.0, 1.0, 0, ctypes.c_double(-1.0), None, None, None))
    with pytest.raises(ValueError, match="gradient count -1 is negative"):
        _lib.check(_lib.lib.nibble_set_grads(handle, None, -1, None))
    assert all(torch.equal(p.detach(), q) for p, q in zip(params, before))
    assert opt.counters() == [(1, 0)]


def test_set_hyper_through_the_c_interface_refuses_bad_input_and_changes_nothing():
    net, twin = model(), model()
    opt, ref = nibble.AdamW(net.parameters()), nibble.AdamW(twin.parameters())
    train(net, opt, 1)
    train(twin, ref, 1)
    handle = opt._groups[0].handle
    for text, message in [(b"[1]", r"nibble_set_hyper: expected a JSON object, got \[1\]"),
                          (b"{", "nibble_set_hyper: the hyperparameters are not valid JSON"),
                          (b'{"betta1": 0.5}', "hyper.betta1 is not a nibble hyperparameter"),
                          (b'{"beta1": "0.5"}', 'hyper.beta1 must be a number, got "0.5"'),
                          (b'{"amsgrad": 1}', "hyper.amsgrad must be true or false, got 1"),
                          (b'{"eps": -1}', "adamw: eps must be > 0, got -1")]:
        with pytest.raises(ValueError, match=message):
            _lib.check(_lib.lib.nibble_set_hyper(handle, text, None))
    with pytest.raises(ValueError, match="nibble_set_hyper: a stream was given to an optimizer on the CPU"):
        _lib.check(_lib.lib.nibble_set_hyper(handle, b'{"beta1": 0.5}', ctypes.c_void_p(0x1000)))
    train(net, opt, 2, seed=2)
    train(twin, ref, 2, seed=2)
    assert_same_models(net, twin)
    _lib.check(_lib.lib.nibble_set_hyper(handle, b'{"beta1": 0.5}', None))
    train(net, opt, 1, seed=3)
    train(twin, ref, 1, seed=3)
    assert not all(torch.equal(p, q) for p, q in zip(net.parameters(), twin.parameters()))


def test_a_state_load_would_refuse_is_not_saved_over_a_good_file(tmp_path):
    # check_finite off lets a NaN gradient into the state; saving it would replace the last good
    # checkpoint with one no load accepts.
    net = model()
    opt = nibble.AdamW(net.parameters(), check_finite=False)
    train(net, opt, 1)
    path = tmp_path / "opt.safetensors"
    _lib.check(_lib.lib.nibble_save(opt._groups[0].handle, str(path).encode()))
    good = path.read_bytes()
    next(net.parameters()).grad.fill_(float("nan"))
    opt.step()
    with pytest.raises(ValueError, match="not saved: state tensor 'state.0.exp_avg' holds inf or NaN, which load"):
        _lib.check(_lib.lib.nibble_save(opt._groups[0].handle, str(path).encode()))
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt.safetensors"]


@pytest.mark.parametrize("name, kwargs, schedule", [
    ("AdamW", dict(lr=1e-2, weight_decay=0.1),
     lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=12)),
    ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True),
     lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=5e-2, total_steps=12)),
    ("SGD", dict(lr=1e-2, momentum=0.9),
     lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=3)),
], ids=["adamw-onecycle", "sgd-nesterov-onecycle", "sgd-cyclic"])
@pytest.mark.parametrize("device", DEVICES)
def test_schedulers_that_cycle_momentum_match_torch(name, kwargs, schedule, device):
    # OneCycleLR and CyclicLR set betas[0] (or momentum) before every step, as well as lr.
    net, ref_net = model(device=device), model(device=device)
    opt = getattr(nibble, name)(net.parameters(), **kwargs)
    ref = getattr(torch.optim, name)(ref_net.parameters(), **kwargs)
    sched, ref_sched = schedule(opt), schedule(ref)
    train(net, opt, 10, scheduler=sched)
    train(ref_net, ref, 10, scheduler=ref_sched)
    assert_close_models(net, ref_net)
    key = "momentum" if name == "SGD" else "betas"
    assert opt.param_groups[0][key] == ref.param_groups[0][key] != kwargs.get(key, (0.9, 0.999))
    assert opt.counters() == [(10, 0)]


@pytest.mark.parametrize("precision", ["fp32", "8bit"])
def test_hyperparameters_changed_between_steps_are_used_and_the_state_kept(precision):
    # A script that edits a group's betas, eps and weight decay after some steps: nibble steps as
    # torch.optim does (fp32), and as a nibble optimizer made with the new values and given the
    # old state (every precision).
    net, ref_net, twin = model(), model(), model()
    opt = nibble.AdamW(net.parameters(), lr=1e-2, weight_decay=0.01, precision=precision)
    ref = torch.optim.AdamW(ref_net.parameters(), lr=1e-2, weight_decay=0.01)
    train(net, opt, 3)
    train(ref_net, ref, 3)
    new = dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.2)
    made = nibble.AdamW(twin.parameters(), lr=1e-2, precision=precision, **new)
    twin.load_state_dict(net.state_dict())
    saved = opt.state_dict()
    saved["param_groups"][0].update(new)  # made with the new values, around the old state
    made.load_state_dict(saved)
    for o in (opt, ref):
        o.param_groups[0].update(new)
    train(net, opt, 3, seed=2)
    train(ref_net, ref, 3, seed=2)
    train(twin, made, 3, seed=2)
    assert_same_models(net, twin)
    if precision == "fp32":
        assert_close_models(net, ref_net)
    assert opt.counters() == [(6, 0)]


def test_settings_that_decide_the_state_are_refused_after_stepping_and_change_nothing():
    net = model()
    params = list(net.parameters())
    opt = nibble.AdamW(net.parameters())
    train(net, opt, 1)
    before = [p.detach().clone() for p in params]
    opt.param_groups[0]["amsgrad"] = True
    with pytest.raises(ValueError, match="parameter group 0: adamw: amsgrad cannot change after the optimizer is "
                                         "made \\(false to true\\): it decides which state is kept"):
        train(net, opt, 1)
    opt.param_groups[0]["amsgrad"] = False
    opt.param_groups[0]["precision"] = "8bit"
    with pytest.raises(ValueError, match="parameter group 0: precision changed after its first step; it decides the "
                                         "state nibble keeps"):
        train(net, opt, 1)
    opt.param_groups[0]["precision"] = "fp32"
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match=r"parameter group 0: adamw: betas\[1\] \(beta2\) must be in \[0, 1\), got 1.5"):
        train(net, opt, 1)
    assert all(torch.equal(p.detach(), q) for p, q in zip(params, before))
    opt.param_groups[0]["betas"] = (0.9, 0.999)
    train(net, opt, 1)
    assert opt.counters() == [(2, 0)]


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_torch_implementation_arguments_are_taken_and_grouped_as_torch_groups_them(name):
    # A script written for torch's class passes foreach / fused / capturable; nibble's groups hold
    # every key torch's do, with torch's values, so code that reads them finds them.
    kwargs = dict(momentum=0.9) if name == "SGD" else {}
    net, ref_net = model(), model()
    ref = getattr(torch.optim, name)(ref_net.parameters(), lr=1e-2, fused=True, **kwargs)
    opt = getattr(nibble, name)(net.parameters(), lr=1e-2, fused=True, **kwargs)
    theirs, ours = ref.param_groups[0], opt.param_groups[0]
    assert set(theirs) - set(ours) == set()
    assert {k: ours[k] for k in theirs if k != "params"} == {k: v for k, v in theirs.items() if k != "params"}
    train(net, opt, 3)
    train(ref_net, ref, 3)
    assert_close_models(net, ref_net)
    for bad, message in [(dict(differentiable=True), "differentiable=True is not supported: nibble's step runs "
                                                      "outside autograd"),
                         (dict(foreach=True, fused=True), "foreach and fused cannot both be True")]:
        with pytest.raises(ValueError, match=message):
            getattr(nibble, name)(net.parameters(), **bad)


def test_adam_with_decoupled_weight_decay_is_adamw_as_in_torch():
    net, ref_net, coupled_net = model(), model(), model()
    opt = nibble.Adam(net.parameters(), lr=1e-2, weight_decay=0.3, decoupled_weight_decay=True, precision="8bit")
    ref = nibble.AdamW(ref_net.parameters(), lr=1e-2, weight_decay=0.3, precision="8bit")
    coupled = nibble.Adam(coupled_net.parameters(), lr=1e-2, weight_decay=0.3, precision="8bit")
    for n, o in ((net, opt), (ref_net, ref), (coupled_net, coupled)):
        train(n, o, 3)
    assert_same_models(net, ref_net)
    assert max_diff(net, coupled_net) > 1e-4
    torch_net = model()
    torch_opt = torch.optim.Adam(torch_net.parameters(), lr=1e-2, weight_decay=0.3, decoupled_weight_decay=True)
    fp32_net = model()
    fp32 = nibble.Adam(fp32_net.parameters(), lr=1e-2, weight_decay=0.3, decoupled_weight_decay=True)
    train(torch_net, torch_opt, 3)
    train(fp32_net, fp32, 3)
    assert_close_models(fp32_net, torch_net)
    with pytest.raises(ValueError, match="AdamW always decouples weight decay; decoupled_weight_decay=False is "
                                         "nibble.Adam"):
        nibble.AdamW(net.parameters(), decoupled_weight_decay=False)


def test_sixteen_bit_parameters_need_cuda():
    net = model().to(torch.bfloat16)
    with pytest.raises(ValueError, match="parameter 0: the CPU backend steps float32 parameters, got torch.bfloat16"):
        nibble.AdamW(net.parameters())


# -- what users do to parameters, groups and state between steps, as torch.optim allows -------------

def twins(precision: str = "fp32"):
    """A model and nibble AdamW beside the same model and torch.optim.AdamW (nibble fp32 follows
    torch within RTOL/ATOL)."""
    a, b = model(), model()
    return a, nibble.AdamW(a.parameters(), lr=1e-2, precision=precision), b, torch.optim.AdamW(b.parameters(), lr=1e-2)


def test_replaced_parameter_storage_is_stepped_with_its_state():
    # p.data = ... (as model.to(), load_state_dict(assign=True) or weight swaps do it): the step
    # writes the new storage, the state carries over, and the old storage is left alone.
    a, opt_a, b, opt_b = twins()
    train(a, opt_a, 3)
    train(b, opt_b, 3)
    old = a[0].weight.data
    kept = old.clone()
    for net in (a, b):
        net[0].weight.data = net[0].weight.data.clone() + 0.5
    train(a, opt_a, 3, seed=2)
    train(b, opt_b, 3, seed=2)
    assert_close_models(a, b)
    assert torch.equal(old, kept)
    assert opt_a.counters() == [(6, 0)]


def test_an_edited_params_list_is_refused_after_the_first_step_and_followed_before():
    # Before any step the group is read as it is then (FSDP2 wrappers swap in DTensors that way).
    a, opt_a, b, opt_b = twins()
    for net, opt in ((a, opt_a), (b, opt_b)):
        fresh = torch.nn.Parameter(net[2].bias.detach().clone())
        opt.param_groups[0]["params"][3] = fresh
        net[2].bias = fresh
    train(a, opt_a, 2)
    train(b, opt_b, 2)
    assert_close_models(a, b)
    # After it, nibble's state is per position: another tensor in a position, or one more, is
    # refused, naming why, and nothing changes.
    before = [p.clone() for p in a.parameters()]
    extra = torch.nn.Parameter(torch.ones(3))
    extra.grad = torch.ones(3)
    opt_a.param_groups[0]["params"].append(extra)
    with pytest.raises(ValueError, match="parameter group 0: its parameters changed after its first step "
                                         r"\(it held 4 parameters and holds 5\)"):
        opt_a.step()
    opt_a.param_groups[0]["params"].pop()
    opt_a.param_groups[0]["params"][1] = extra
    with pytest.raises(ValueError, match=r"\(parameter 1 is another tensor\)"):
        opt_a.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    assert torch.equal(extra, torch.ones(3))
    assert opt_a.counters() == [(2, 0)]


def test_a_removed_group_takes_its_state_with_it():
    net = model()
    params = list(net.parameters())
    opt = nibble.AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 0.2}], lr=0.1)
    ref_net = model()
    ref_params = list(ref_net.parameters())
    ref = torch.optim.AdamW([{"params": ref_params[:2]}, {"params": ref_params[2:], "lr": 0.2}], lr=0.1)
    train(net, opt, 2)
    train(ref_net, ref, 2)
    del opt.param_groups[0]
    del ref.param_groups[0]
    train(net, opt, 2, seed=3)
    train(ref_net, ref, 2, seed=3)
    assert_close_models(net, ref_net)
    assert opt.counters() == [(4, 0)]


def test_a_refused_step_steps_no_group():
    net = model()
    params = list(net.parameters())
    opt = nibble.AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 0.2}], lr=0.1)
    train(net, opt, 1)
    before = [p.clone() for p in params]
    opt.param_groups[1]["amsgrad"] = True
    with pytest.raises(ValueError, match="parameter group 1: adamw: amsgrad cannot change"):
        train(net, opt, 1)
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert opt.counters() == [(1, 0), (1, 0)]


def test_a_refused_state_dict_leaves_groups_and_state_as_they_were():
    net = model()
    params = list(net.parameters())
    opt = nibble.AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 0.2}], lr=0.1)
    train(net, opt, 2)
    before = opt.state_dict()
    swapped = copy.deepcopy(before)
    swapped["param_groups"] = swapped["param_groups"][::-1]  # groups in the other order
    bad_betas = copy.deepcopy(before)
    bad_betas["param_groups"][1]["betas"] = (0.9, 1.5)
    other = model()
    other_params = list(other.parameters())
    torch_opt = torch.optim.SGD([{"params": other_params[:2]}, {"params": other_params[2:], "lr": 0.2}], lr=0.1,
                                momentum=0.9)  # torch.optim's layout of another algorithm's state
    train(other, torch_opt, 1)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    for wrong, match in ((swapped, "parameter group 0 of the state_dict"),
                         (bad_betas, r"parameter group 1 of the state_dict: adamw: betas\[1\] \(beta2\)"),
                         (torch_opt.state_dict(), r"parameter 0 \(group 0, position 0\): the state_dict holds "
                                                  r"\['momentum_buffer'\], this optimizer \(adamw\) keeps")):
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(wrong)
        after = opt.state_dict()
        assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
        assert opt.param_groups[1]["betas"] == (0.9, 0.999)
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == settings
        assert opt.counters() == [(2, 0), (2, 0)]
        for key, entry in before["state"].items():
            for name, value in entry.items():
                assert torch.equal(value, after["state"][key][name]), (key, name)
    train(net, opt, 1)  # and it still steps


@pytest.mark.parametrize("name, kwargs", [("SGD", dict(momentum=0.9, nesterov=True)), ("Adam", dict(amsgrad=True)),
                                          ("AdamW", dict(weight_decay=0.1)),
                                          ("RAdam", dict(weight_decay=0.1, decoupled_weight_decay=True))])
def test_a_torch_optim_state_dict_loads_and_the_run_continues(name, kwargs):
    # A run begun with torch.optim continues with nibble from torch's checkpoint: exactly at fp32,
    # within the quantization of the state at 8 bits (memory saved from the resume on).
    torch_net = model()
    torch_opt = getattr(torch.optim, name)(torch_net.parameters(), lr=1e-2, **kwargs)
    train(torch_net, torch_opt, 3)
    saved = torch_opt.state_dict()
    resumed = {}
    for precision in ("fp32", "8bit"):
        net = model()
        net.load_state_dict(torch_net.state_dict())
        opt = getattr(nibble, name)(net.parameters(), lr=1e-2, precision=precision, min_quant_size=0, **kwargs)
        opt.load_state_dict(saved)
        # torch.optim.SGD counts no steps: a parameter with a momentum buffer has taken at least one.
        assert opt.counters() == [(1 if name == "SGD" else 3, 0)] and opt.param_groups[0]["precision"] == precision
        train(net, opt, 3, seed=2)
        resumed[precision] = net
    fresh_net = model()
    fresh_net.load_state_dict(torch_net.state_dict())
    fresh = getattr(nibble, name)(fresh_net.parameters(), lr=1e-2, **kwargs)
    train(fresh_net, fresh, 3, seed=2)
    train(torch_net, torch_opt, 3, seed=2)
    assert_close_models(resumed["fp32"], torch_net)
    assert max_diff(fresh_net, torch_net) > 1e-4  # the loaded state mattered
    assert max_diff(resumed["8bit"], torch_net) < 0.1 * max_diff(fresh_net, torch_net)


def test_a_torch_optim_state_dict_of_other_state_is_refused_and_changes_nothing():
    torch_net = model()
    torch_opt = torch.optim.AdamW(torch_net.parameters(), lr=1e-2)
    train(torch_net, torch_opt, 2)
    net, twin = model(), model()
    opt, ref = nibble.Lion(net.parameters(), lr=1e-3), nibble.Lion(twin.parameters(), lr=1e-3)
    train(net, opt, 1)
    train(twin, ref, 1)
    with pytest.raises(ValueError, match=r"parameter 0 \(group 0, position 0\): the state_dict holds \['exp_avg', "
                                         r"'exp_avg_sq', 'step'\], this optimizer \(lion\) keeps \['exp_avg', 'step'\]"):
        opt.load_state_dict(torch_opt.state_dict())
    adamw = nibble.AdamW(net.parameters(), lr=1e-2)
    bad_shape = copy.deepcopy(torch_opt.state_dict())  # torch's entries are its live state dicts
    bad_shape["state"][1]["exp_avg"] = bad_shape["state"][1]["exp_avg"][:5]
    with pytest.raises(ValueError, match=r"parameter 1 \(group 0, position 1\): state 'exp_avg' has shape \[5\], the "
                                         r"parameter \[129\]"):
        adamw.load_state_dict(bad_shape)
    negative = copy.deepcopy(torch_opt.state_dict())
    negative["state"][2]["exp_avg_sq"][0, 0] = -1.0
    with pytest.raises(ValueError, match=r"parameter 2 \(group 0, position 2\): parameter 'param.2': state 'exp_avg_sq' "
                                         r"holds -1 at element 0; it must be >= 0"):
        adamw.load_state_dict(negative)
    assert adamw.counters() == []  # no group took any state
    train(net, opt, 2, seed=3)
    train(twin, ref, 2, seed=3)
    assert_same_models(net, twin)


@pytest.mark.parametrize("precision", ["fp32", "8bit"])
def test_assigning_a_new_state_mapping_resets_the_state_as_in_torch(precision):
    # optimizer.state = defaultdict(dict) forgets every moment and step count in torch.optim; the
    # run goes on as a fresh optimizer started from the parameters of that moment.
    net, torch_net = model(), model()
    opt = nibble.AdamW(net.parameters(), lr=1e-2, precision=precision, min_quant_size=0)
    ref = torch.optim.AdamW(torch_net.parameters(), lr=1e-2)
    train(net, opt, 3)
    train(torch_net, ref, 3)
    fresh_net = model()
    fresh_net.load_state_dict(net.state_dict())
    fresh = nibble.AdamW(fresh_net.parameters(), lr=1e-2, precision=precision, min_quant_size=0)
    opt.state = collections.defaultdict(dict)
    ref.state = collections.defaultdict(dict)
    assert not opt.state and opt.counters() == []
    train(net, opt, 3, seed=2)
    train(torch_net, ref, 3, seed=2)
    train(fresh_net, fresh, 3, seed=2)
    assert_same_models(net, fresh_net)
    assert opt.counters() == [(3, 0)]
    if precision == "fp32":
        assert_close_models(net, torch_net)


def test_a_compiled_training_step_runs_the_step_eagerly_without_warnings():
    # torch.compile over forward, backward and step: Dynamo leaves nibble's step to run eagerly (one
    # graph break) instead of trying, and warning about, its ctypes calls. "eager" compiles the
    # graphs Dynamo captures without generating code, so the test stays quick.
    def run(compiled: bool) -> tuple[list[float], list]:
        net = model()
        opt = nibble.AdamW8bit(net.parameters(), lr=1e-2, min_quant_size=0)

        def step(x: torch.Tensor) -> torch.Tensor:
            loss = net(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        fn = torch.compile(step, backend="eager") if compiled else step
        gen = torch.Generator().manual_seed(1)
        return [fn(torch.randn(16, 32, generator=gen)).item() for _ in range(4)], opt.counters()

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = run(True)
    assert [str(w.message) for w in caught if "Dynamo" in str(w.message)] == []
    assert compiled == run(False)


def test_a_plain_number_step_loads():
    # "step" as a plain number, as older torch.optim checkpoints hold it.
    a, b = model(), model()
    opt_a = nibble.AdamW(a.parameters(), lr=1e-2)
    train(a, opt_a, 3)
    state = opt_a.state_dict()
    for entry in state["state"].values():
        entry["step"] = int(entry["step"].item())
    b.load_state_dict(a.state_dict())
    opt_b = nibble.AdamW(b.parameters(), lr=1e-2)
    opt_b.load_state_dict(state)
    train(a, opt_a, 2, seed=6)
    train(b, opt_b, 2, seed=6)
    assert_same_models(a, b)


def test_state_dict_hooks_run_as_torch_optims_do():
    net = model()
    opt = nibble.AdamW(net.parameters())
    train(net, opt, 1)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: dict(sd, extra="post") if calls.append("sd_post") is None else sd)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    state = opt.state_dict()
    assert state["extra"] == "post"
    opt.load_state_dict(state)
    assert calls == ["sd_pre", "sd_post", "load_pre", "load_post"]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_continues_in_lockstep_with_the_original(how):
    import pickle
    net = model()
    opt = nibble.AdamW8bit(net.parameters(), lr=1e-2, min_quant_size=0)
    train(net, opt, 3)
    net_copy, opt_copy = copy.deepcopy((net, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((net, opt)))
    assert opt_copy.counters() == [(3, 0)]
    train(net, opt, 3, seed=7)
    train(net_copy, opt_copy, 3, seed=7)
    assert_same_models(net, net_copy)


def test_settings_may_change_until_the_first_step():
    # state_dict() (an initial checkpoint) before training makes nibble's state; the group's
    # settings may still change until a step has been taken.
    a, opt_a, b, opt_b = twins()
    opt_a.state_dict()
    for opt in (opt_a, opt_b):
        opt.param_groups[0]["weight_decay"] = 0.0
    train(a, opt_a, 2)
    train(b, opt_b, 2)
    assert_close_models(a, b)


def test_sophia_hessian_updates_and_steps():
    net = model()
    opt = nibble.SophiaG(net.parameters(), lr=1e-3, min_quant_size=0, precision="8bit")
    train(net, opt, 2)
    opt.update_hessian()
    before = copy.deepcopy(net)
    train(net, opt, 1)
    assert max_diff(net, before) > 0.0
    with pytest.raises(ValueError, match="estimates"):
        opt.update_hessian([[None]])


@pytest.mark.parametrize("device", DEVICES)
def test_clipping_over_groups_equals_clip_grad_norm(device):
    """max_grad_norm over two groups clips by the norm of all gradients, as
    torch.nn.utils.clip_grad_norm_ before an unclipped optimizer does; an inf gradient in either
    group skips both. On CUDA the norm never leaves the device (last_grad_norm is a 0-d tensor).
    fp32 state: quantized state would turn the clip coefficients' last-bit differences into code
    flips."""
    a, b = model(device=device), model(device=device)

    def groups(net):
        params = list(net.parameters())
        return [{"params": params[:2]}, {"params": params[2:], "lr": 5e-3}]
    clipped = nibble.AdamW(groups(a), lr=1e-2, max_grad_norm=0.05)
    plain = nibble.AdamW(groups(b), lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        x = torch.randn(16, 32, generator=gen).to(device)
        for net in (a, b):
            net.zero_grad()
            net(x).square().mean().backward()
        own = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in a.parameters()])).item()
        norm = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05)
        assert norm.item() > 0.05, "the test means clipping to be active"
        clipped.step()
        plain.step()
        assert abs(float(clipped.last_grad_norm) - own) <= 1e-12 * own
    for p, q in zip(a.parameters(), b.parameters()):
        # the norm summed in double against clip_grad_norm_'s float: the clip coefficients may
        # differ in the last float bit, which AdamW's normalised update nearly cancels.
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    before = [p.detach().clone() for p in a.parameters()]
    a.zero_grad()
    a(torch.randn(16, 32, generator=gen).to(device)).square().mean().backward()
    with torch.no_grad():
        list(a.parameters())[3].grad[0] = float("inf")  # in the second group only
    clipped.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    assert clipped.counters() == [(4, 1), (4, 1)]


@pytest.mark.parametrize("device", DEVICES)
def test_one_group_that_clips_reports_its_norm(device):
    """One group with max_grad_norm: last_grad_norm is the norm before clipping, each step (on CUDA
    a 0-d tensor copied from the step's own norm on the device)."""
    net = model(device=device)
    opt = nibble.AdamW(net.parameters(), lr=1e-2, max_grad_norm=0.05)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        net.zero_grad()
        net(torch.randn(16, 32, generator=gen).to(device)).square().mean().backward()
        own = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in net.parameters()])).item()
        opt.step()
        assert abs(float(opt.last_grad_norm) - own) <= 1e-12 * own


def test_device_square_sum_calls_are_refused_on_the_cpu():
    """The C calls behind the CUDA sharded step (a square sum queued into device memory, a step
    that reads one) refuse a CPU optimizer, saying what it takes instead."""
    net = model()
    opt = nibble.AdamW(net.parameters())
    train(net, opt, 1)
    made = opt._groups[0]
    with pytest.raises(ValueError, match=r"CUDA optimizers.*grad_square_sum\(\)"):
        made.enqueue_grad_square_sum(torch.zeros((), dtype=torch.float64))
    with pytest.raises(ValueError, match="CUDA optimizers"):
        made.step_device_with_square_sum(torch.tensor(1.0), torch.tensor(1.0), torch.zeros((), dtype=torch.float64))
    assert opt.counters() == [(1, 0)]


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_graph_capture_equals_eager():
    a, b = model(device="cuda"), model(device="cuda")
    opt_a = nibble.AdamW(a.parameters(), lr=1e-2, precision="8bit", min_quant_size=0)
    opt_b = nibble.AdamW(b.parameters(), lr=torch.tensor(1e-2, device="cuda"), precision="8bit", min_quant_size=0)
    x = torch.randn(16, 32, device="cuda")
    for net in (a, b):
        net(x).square().mean().backward()
    opt_a.step()
    opt_b.step()  # the first step creates nibble's state outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_b.step()
    for step in range(5):
        lr = 1e-2 * (0.8 ** step)
        opt_a.param_groups[0]["lr"] = lr
        opt_b.param_groups[0]["lr"].fill_(lr)
        opt_a.step()
        graph.replay()
    torch.cuda.synchronize()
    assert_same_models(a, b)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_state_loads_on_the_cpu():
    a = model(device="cuda")
    opt = nibble.AdamW(a.parameters(), precision="8bit", min_quant_size=0)
    train(a, opt, 4)
    b = model()
    b.load_state_dict({k: v.cpu() for k, v in a.state_dict().items()})
    opt_b = nibble.AdamW(b.parameters(), precision="8bit", min_quant_size=0)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    train(a, opt, 3, seed=9)
    train(b, opt_b, 3, seed=9)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-5, atol=1e-6)


def test_the_step_is_an_operator_in_pytorchs_registry():
    schema = str(torch.ops.nibble.step.default._schema)
    assert "Tensor(a!)[] params" in schema, schema
    assert "Tensor(a!)[] params" in str(torch.ops.nibble.step_device.default._schema)
    # The registered CPU kernel is what a CPU step runs: calling it directly steps the parameters.
    net = model()
    opt = nibble.AdamW(net.parameters(), lr=1e-2)
    train(net, opt, 1)
    before = [p.detach().clone() for p in net.parameters()]
    made = opt._groups[0]
    torch.ops.nibble.step(made.handle, list(net.parameters()), 1e-2, 1.0, 0)
    assert opt.counters() == [(2, 0)]
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), before))


def test_fp8_first_moment_codes_are_torch_float8_e4m3fn():
    """fp8 first moments hold the OCP e4m3fn codes of y * 256 (y = x / block absmax): torch's own
    float32 -> float8_e4m3fn conversion (round to nearest even, subnormals) is the reference. SGD's
    first momentum buffer is the gradient itself; blocks of 256 with absmax 1 make y = x exactly."""
    gen = torch.Generator().manual_seed(3)
    blocks = 64
    g = (torch.rand(blocks, 256, generator=gen) * 2 - 1) * torch.pow(10.0, -6 * torch.rand(blocks, 256, generator=gen))
    # Every e4m3 value below 256, the midpoints between neighbours (exact ties), and the floats
    # next to them, all divided by 256 (then y * 256 lands on and around them).
    finite = torch.arange(0, 0x79, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (finite[:-1] + finite[1:]) / 2
    special = torch.cat([finite, mids, torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(1e9))]) / 256
    special = torch.cat([special, -special[1:]])  # not -0: the buffer 0.9 * 0 + (-0) is +0
    g.view(-1)[: special.numel()] = special[: blocks * 256]
    g[:, 0] = 1.0  # each block's absmax
    param = torch.nn.Parameter(torch.zeros(blocks * 256))
    param.grad = g.flatten().clone()
    opt = nibble.SGD([param], lr=0.1, momentum=0.9, precision="fp8", min_quant_size=0)
    opt.step()
    entry = opt.state_dict()["state"][0]
    codes = entry["momentum_buffer.codes"]
    assert codes.dtype == torch.uint8
    assert torch.equal(entry["momentum_buffer.absmax"], torch.ones(blocks))
    want = (g.flatten() * 256).to(torch.float8_e4m3fn).view(torch.uint8)
    differ = (codes != want).nonzero().flatten()
    assert differ.numel() == 0, f"{differ.numel()} codes differ from torch, first at {differ[0].item()}: " \
        f"x = {g.flatten()[differ[0]].item()!r}, nibble {codes[differ[0]].item():#x}, torch {want[differ[0]].item():#x}"
