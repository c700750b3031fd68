"""nibble.AdamWScheduleFree against the schedulefree package's AdamWScheduleFree (the reference
implementation by its authors): the same training with train()/eval() switches ends at the same
parameters in both modes; state_dict round trips in either mode; steps in eval mode are refused;
the Hugging Face Trainer's `optimizer.train()` call works."""
from __future__ import annotations

import pytest
import torch

import nibble
from test_optim import assert_same_models

schedulefree = pytest.importorskip("schedulefree")


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 129), torch.nn.GELU(), torch.nn.Linear(129, 7))


def train(net: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 32, generator=gen)
        opt.zero_grad()
        (net(x) - 0.5).square().mean().backward()
        opt.step()


# PyTorch's fp32 tolerances for two implementations of one update, 5x (test_optim.py's). nibble
# takes its hyperparameters as fp32 (the package's bias correction 1 - beta2^k and 1 - beta2 use the
# double 0.999): ~1e-5 relative on the second moment early on, far inside these.
RTOL, ATOL = 5 * 1.3e-6, 5 * 1e-5


def assert_close(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kwargs", [
    dict(lr=1e-2, warmup_steps=5, weight_decay=0.01),
    # Still warming up at the end; weights growing as step^0.5 and linearly in lr_max.
    dict(lr=5e-3, betas=(0.8, 0.99), eps=1e-6, warmup_steps=30, r=0.5, weight_lr_power=1.0, weight_decay=0.1),
], ids=["warmup_wd", "long_warmup_r_power"])
def test_matches_the_schedulefree_package(kwargs):
    start, ours, theirs = model(), model(), model()
    opt_ours = nibble.AdamWScheduleFree(ours.parameters(), **kwargs)
    opt_theirs = schedulefree.AdamWScheduleFree(theirs.parameters(), **kwargs)
    for opt in (opt_ours, opt_theirs):
        opt.train()
    for chunk, steps in enumerate((8, 8, 8)):
        train(ours, opt_ours, steps, seed=chunk)
        train(theirs, opt_theirs, steps, seed=chunk)
        assert_close(ours, theirs)  # y
        opt_ours.eval()
        opt_theirs.eval()
        assert_close(ours, theirs)  # x
        assert not opt_ours.param_groups[0]["train_mode"]
        opt_ours.train()
        opt_theirs.train()
    assert_close(ours, theirs)
    assert max((p - q).abs().max().item() for p, q in zip(ours.parameters(), start.parameters())) > 1e-3


def test_a_new_optimizer_is_in_train_mode_and_eval_mode_refuses_steps():
    net = model()
    opt = nibble.AdamWScheduleFree(net.parameters())
    assert opt.param_groups[0]["train_mode"]  # the package starts in eval mode: nibble's one difference
    train(net, opt, 2)
    opt.eval()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="eval mode.*train\\(\\)"):
        train(net, opt, 1)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    assert opt.counters() == [(2, 0)]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("precision", ["fp32", "8bit"])
def test_state_dict_round_trip_in_either_mode(mode, precision):
    a, b = model(), model()
    opt_a = nibble.AdamWScheduleFree(a.parameters(), lr=1e-2, warmup_steps=3, precision=precision, min_quant_size=0)
    train(a, opt_a, 10)
    if mode == "eval":
        opt_a.eval()
    state = opt_a.state_dict()
    entry = state["state"][0]
    assert entry["z"].dtype == torch.float32 and entry["z"].shape == a[0].weight.shape  # fp32 at every precision
    assert entry["lr_max"].dtype == torch.float64 and entry["weight_sum"].dtype == torch.float64
    assert state["param_groups"][0]["train_mode"] == (mode == "train")
    assert state["param_groups"][0]["nibble"]["mode"] == mode
    b.load_state_dict(a.state_dict())
    opt_b = nibble.AdamWScheduleFree(b.parameters(), lr=1e-2, warmup_steps=3, precision=precision, min_quant_size=0)
    opt_b.load_state_dict(state)
    assert opt_b.param_groups[0]["train_mode"] == (mode == "train")
    opt_a.train()
    opt_b.train()
    train(a, opt_a, 10, seed=5)
    train(b, opt_b, 10, seed=5)
    assert_same_models(a, b)


def test_the_8bit_alias_keeps_z_fp32():
    net = model()
    opt = nibble.AdamWScheduleFree8bit(net.parameters(), min_quant_size=0)
    assert opt.param_groups[0]["precision"] == "8bit"
    params = sum(p.numel() for p in net.parameters())
    # z: 4 bytes per element; exp_avg_sq: one code byte, and an fp32 absmax per 256-element block.
    blocks = sum(-(-p.numel() // 256) for p in net.parameters())
    assert opt.state_bytes() == 4 * params + params + 4 * blocks


def test_hf_trainer_style_mode_calls():
    # transformers.Trainer calls optimizer.train() / .eval() when the optimizer has them.
    net = model()
    opt = nibble.AdamWScheduleFree(net.parameters())
    assert callable(getattr(opt, "train", None)) and callable(getattr(opt, "eval", None))
    opt.eval()  # before any step: nothing to move
    opt.train()
    train(net, opt, 3)
    opt.eval()
    opt.train()
    train(net, opt, 1)
    assert opt.counters() == [(4, 0)]


@pytest.mark.parametrize("make,match", [
    (lambda p: nibble.AdamWScheduleFree(p, warmup_steps=-1), "warmup_steps"),
    (lambda p: nibble.AdamWScheduleFree(p, warmup_steps=2.5), "warmup_steps must be an integer"),
    (lambda p: nibble.AdamWScheduleFree(p, betas=(0.0, 0.999)), r"betas\[0\].*\(0, 1\)"),
    (lambda p: nibble.AdamWScheduleFree(p, weight_lr_power=float("nan")), "weight_lr_power"),
])
def test_bad_arguments_raise_value_error_naming_them(make, match):
    with pytest.raises(ValueError, match=match):
        make(model().parameters())
