"""nibble: training optimizers with fp32, bf16, 8-bit or 4-bit state for PyTorch, on CPU and CUDA
tensors, over nibble's C++/CUDA kernels. Drop-in: `optim = nibble.AdamW8bit(model.parameters())`."""
from ._lib import cuda_available
from .optim import (SGD, QHM, Adafactor, Adam, Adam4bit, Adam8bit, AdamP, AdamW, AdamW4bit, AdamW8bit, Lion,
                    Lion8bit, NibbleOptimizer, SophiaG)

__all__ = ["SGD", "Adam", "AdamW", "Lion", "Adafactor", "AdamP", "QHM", "SophiaG", "Adam8bit", "Adam4bit",
           "AdamW8bit", "AdamW4bit", "Lion8bit", "NibbleOptimizer", "cuda_available"]
