"""nibble's ADOPT and AdEMAMix against the implementations users compare them with: the
pytorch-optimizer package's ADOPT and AdEMAMix, trained side by side for 20 steps. Where that
package's defaults or formulas differ from the authors' code, which nibble follows, the settings
below pick the behaviour both share, and each difference is named and tested on its own."""
from __future__ import annotations

import pytest
import torch

import nibble
from test_optim import ATOL, RTOL, max_diff, model, train

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")


def assert_same_training(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer, a: torch.nn.Module,
                         b: torch.nn.Module, rtol: float = RTOL, atol: float = ATOL) -> None:
    train(a, ours, 20)
    train(b, theirs, 20)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
    assert max_diff(a, model()) > 1e-3, "the run did not move the parameters"


# ADOPT. pytorch-optimizer clips the normalised gradient at step t to t^0.25, the authors' code
# (and nibble) to (t-1)^0.25, the number of updates taken so far; unclipped, the two agree. With
# decoupled weight decay pytorch-optimizer also decays on the first step, which only records the
# second moment in the authors' code; coupled decay (added to the gradient) agrees.
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adopt_matches_pytorch_optimizer_unclipped(weight_decay):
    a, b = model(), model()
    # eps 1e-3: unclipped ADOPT divides by the first step's |g|, which is near zero for some entries.
    ours = nibble.ADOPT(a.parameters(), lr=1e-3, betas=(0.9, 0.9999), eps=1e-3, weight_decay=weight_decay,
                        decouple=False, clip_exponent=None)
    theirs = pytorch_optimizer.ADOPT(b.parameters(), lr=1e-3, betas=(0.9, 0.9999), eps=1e-3,
                                     weight_decay=weight_decay, weight_decouple=False, clip_lambda=None,
                                     foreach=False)
    assert_same_training(ours, theirs, a, b)


def test_adopt_clips_by_updates_taken_where_pytorch_optimizer_clips_by_step():
    # The same run with pytorch-optimizer told to clip at (t-1)^0.25 matches nibble's default clip.
    a, b = model(), model()
    ours = nibble.ADOPT(a.parameters(), lr=1e-2, eps=1e-6, clip_exponent=0.25)
    theirs = pytorch_optimizer.ADOPT(b.parameters(), lr=1e-2, eps=1e-6, clip_lambda=lambda t: (t - 1) ** 0.25,
                                     foreach=False)
    assert_same_training(ours, theirs, a, b)
    # ... and differs from pytorch-optimizer's own clip, which lets larger normalised gradients through.
    c = model()
    train(c, pytorch_optimizer.ADOPT(c.parameters(), lr=1e-2, eps=1e-6, foreach=False), 20)
    assert max_diff(a, c) > 1e-5


# AdEMAMix. pytorch-optimizer couples weight decay unless weight_decouple=True (the authors' code
# decouples), defaults alpha to 5 (the authors' to 2), and warms alpha and beta3 up over one
# period t_alpha_beta3; nibble takes the two periods separately, here set equal. Its beta3
# schedule is the authors' half-life interpolation written in closed form (the authors add 1e-8
# inside the logarithms, nibble as they do): beta3 agrees to about 1e-8, hence 1e-4 relative on
# 1 - beta3 = 1e-4, far inside the tolerance.
@pytest.mark.parametrize("warmup", [None, 12])
def test_ademamix_matches_pytorch_optimizer(warmup):
    a, b = model(), model()
    ours = nibble.AdEMAMix(a.parameters(), lr=5e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, alpha_warmup=warmup,
                           beta3_warmup=warmup, eps=1e-8, weight_decay=0.1)
    theirs = pytorch_optimizer.AdEMAMix(b.parameters(), lr=5e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0,
                                        t_alpha_beta3=warmup, eps=1e-8, weight_decay=0.1, weight_decouple=True,
                                        foreach=False)
    assert_same_training(ours, theirs, a, b)
