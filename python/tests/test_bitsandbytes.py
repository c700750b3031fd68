"""A run begun with bitsandbytes' optimizers continues with nibble's from bitsandbytes' state_dict:
its 8-bit state (codes of the same dynamic maps, one absmax per block of 256) becomes nibble's
state code for code, its 32-bit state value for value; state nibble's class does not keep is
refused by name, and a refused state_dict changes nothing."""
from __future__ import annotations

import pytest
import torch

import nibble
from test_optim import assert_close_models, max_diff, model, train

bnb = pytest.importorskip("bitsandbytes")


def _resumed(theirs: torch.optim.Optimizer, trained: torch.nn.Module, make) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    net = model()
    net.load_state_dict(trained.state_dict())
    opt = make(net.parameters())
    opt.load_state_dict(theirs.state_dict())
    return net, opt


@pytest.mark.parametrize("theirs_cls, ours_cls, slots", [
    ("AdamW8bit", nibble.AdamW8bit, [("exp_avg", "state1"), ("exp_avg_sq", "state2")]),
    ("Adam8bit", nibble.Adam8bit, [("exp_avg", "state1"), ("exp_avg_sq", "state2")]),
    ("Lion8bit", nibble.Lion8bit, [("exp_avg", "state1")]),
    ("SGD8bit", nibble.SGD, [("momentum_buffer", "state1")]),
])
def test_eight_bit_state_loads_code_for_code(theirs_cls, ours_cls, slots):
    trained = model()
    extra = dict(momentum=0.9) if theirs_cls == "SGD8bit" else {}
    theirs = getattr(bnb.optim, theirs_cls)(trained.parameters(), lr=1e-3, min_8bit_size=0, **extra)
    train(trained, theirs, 3)
    precision = dict(precision="8bit") if theirs_cls == "SGD8bit" else {}
    net, ours = _resumed(theirs, trained, lambda params: ours_cls(params, lr=1e-3, min_quant_size=0, **extra,
                                                                 **precision))
    assert ours.counters() == [(3, 0)]
    # Only nibble's own settings: none of bitsandbytes' other group keys come along.
    assert set(ours.param_groups[0]) == set(ours_cls(model().parameters(), **extra).param_groups[0])
    saved = ours.state_dict()["state"]
    for i, p in enumerate(trained.parameters()):
        for name, theirs_name in slots:
            codes = theirs.state[p][theirs_name]
            assert codes.dtype == torch.uint8
            assert torch.equal(saved[i][f"{name}.codes"].flatten(), codes.flatten()), (i, name)
    train(net, ours, 2, seed=2)  # and it steps on
    assert ours.counters() == [(5, 0)]


def test_thirty_two_bit_state_continues_as_bitsandbytes_does():
    trained = model()
    theirs = bnb.optim.AdamW(trained.parameters(), lr=1e-2, weight_decay=0.1)
    train(trained, theirs, 3)
    net, ours = _resumed(theirs, trained, lambda params: nibble.AdamW(params, lr=1e-2, weight_decay=0.1))
    fresh = model()
    fresh.load_state_dict(trained.state_dict())
    train(fresh, nibble.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1), 3, seed=2)
    train(trained, theirs, 3, seed=2)
    train(net, ours, 3, seed=2)
    assert_close_models(net, trained)
    assert max_diff(fresh, trained) > 1e-4, "the loaded state did not matter"


def test_state_nibble_does_not_keep_is_refused_and_changes_nothing():
    trained = model()
    adamw = bnb.optim.AdamW8bit(trained.parameters(), lr=1e-3, min_8bit_size=0)
    train(trained, adamw, 2)
    net = model()
    lion = nibble.Lion(net.parameters(), lr=1e-3)
    train(net, lion, 1)
    before = lion.state_dict()
    with pytest.raises(ValueError, match=r"parameter 0 \(group 0, position 0\): the bitsandbytes state holds "
                                         r"\['absmax2', 'qmap2', 'state2'\], which nibble's lion does not keep"):
        lion.load_state_dict(adamw.state_dict())
    assert lion.counters() == [(1, 0)]
    after = lion.state_dict()
    assert all(torch.equal(before["state"][k]["exp_avg"], after["state"][k]["exp_avg"]) for k in before["state"])
    # bitsandbytes' AdEMAMix stacks its two first moments in one state: not read.
    theirs = bnb.optim.AdEMAMix8bit(trained.parameters(), lr=1e-3, min_8bit_size=0)
    train(trained, theirs, 1)
    ademamix = nibble.AdEMAMix(model().parameters())
    with pytest.raises(ValueError, match="the state_dict holds bitsandbytes state; nibble reads it for adam, "
                                         "adamw, lion, sgd, not ademamix"):
        ademamix.load_state_dict(theirs.state_dict())
