# A small GPT written from scratch in PyTorch, the model nibble.bench_torch trains: token and
# position embeddings, pre-LayerNorm blocks (causal self-attention, 4x GELU MLP), a final LayerNorm
# and a head tied to the token embedding, initialised like GPT-2. With bias=False its Linear and
# LayerNorm layers have no biases, as nanoGPT's model trained by its train.py.
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int  # context length in tokens
    vocab_size: int
    bias: bool = True  # biases in the Linear and LayerNorm layers

    def __post_init__(self) -> None:
        if min(self.n_layer, self.n_head, self.n_embd, self.block_size, self.vocab_size) < 1:
            raise ValueError(f"every GPTConfig field must be positive: {self}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")

    def describe(self) -> str:
        return (
            f"{self.n_layer} layers, {self.n_head} heads, width {self.n_embd}, "
            f"context {self.block_size}, vocabulary {self.vocab_size}" + ("" if self.bias else ", no biases")
        )


PRESETS: dict[str, GPTConfig] = {
    # nanoGPT's Shakespeare-char model.
    "char": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65),
    # GPT-2 124M; the vocabulary padded from 50257 to a multiple of 64, as published runs do.
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    # For tests: seconds on a CPU.
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=65),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, width = x.shape
        # (B, T, 3C) -> 3 x (B, heads, T, head width), the layout scaled_dot_product_attention takes.
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_head, width // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, width))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections that write into the residual stream by
        # 1/sqrt(number of residual additions), so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # attn.proj and mlp.proj of every block
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        # parameters() yields the tied embedding once.
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor) -> Tensor:
        """Logits (batch, seq, vocabulary) for token ids idx (batch, seq), seq <= block_size."""
        seq = idx.shape[1]
        if seq > self.config.block_size:
            raise ValueError(f"sequence of {seq} tokens is longer than the context {self.config.block_size}")
        pos = torch.arange(seq, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        # The head is the token embedding itself (weight tying), as in GPT-2.
        return F.linear(self.ln_f(x), self.wte.weight)

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of predicting targets (batch, seq) from idx (batch, seq)."""
        logits = self(idx)
        # Under autocast, cross_entropy itself runs in fp32.
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
