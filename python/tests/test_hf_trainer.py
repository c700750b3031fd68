"""nibble inside the Hugging Face Trainer: a tiny GPT-2 made from a config (no downloads) trains with
optimizer_cls_and_kwargs=(nibble.AdamW8bit, ...), and a run resumed from its mid-way checkpoint
(the optimizer's state through state_dict and torch.save) ends where the uninterrupted run ends."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import nibble  # noqa: E402

STEPS, SAVE_AT = 8, 4


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 128, (64, 32), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer(out: str) -> "transformers.Trainer":
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=32, vocab_size=128,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(output_dir=out, max_steps=STEPS, per_device_train_batch_size=8,
                                          learning_rate=1e-3, save_steps=SAVE_AT, save_strategy="steps",
                                          logging_steps=1, report_to=[], use_cpu=True, seed=0,
                                          dataloader_num_workers=0, disable_tqdm=True)
    # min_quant_size=0: every tensor of this small model gets 8-bit state.
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                optimizer_cls_and_kwargs=(nibble.AdamW8bit, {"min_quant_size": 0}))


def test_trainer_resumes_like_an_uninterrupted_run(tmp_path):
    whole = trainer(str(tmp_path / "whole"))
    whole.train()
    assert isinstance(whole.optimizer.optimizer if hasattr(whole.optimizer, "optimizer") else whole.optimizer,
                      nibble.AdamW8bit)
    losses = [e["loss"] for e in whole.state.log_history if "loss" in e]
    assert len(losses) == STEPS and all(l == l for l in losses), f"losses {losses}"
    checkpoint = tmp_path / "whole" / f"checkpoint-{SAVE_AT}"
    assert (checkpoint / "optimizer.pt").exists()

    resumed = trainer(str(tmp_path / "resumed"))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), f"{name} differs after resuming (max |diff| {(a - b).abs().max().item()})"
    # The resumed trainer's history starts with the checkpoint's first SAVE_AT steps.
    resumed_losses = [e["loss"] for e in resumed.state.log_history if "loss" in e]
    assert resumed_losses[SAVE_AT:] == losses[SAVE_AT:], \
        f"losses {resumed_losses[SAVE_AT:]} after resuming, {losses[SAVE_AT:]} uninterrupted"
