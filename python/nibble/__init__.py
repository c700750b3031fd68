"""nibble: training optimizers with fp32, bf16, 8-bit or 4-bit state for PyTorch, on CPU and CUDA
tensors, over nibble's C++/CUDA kernels. Drop-in: `optim = nibble.AdamW8bit(model.parameters())`."""
from . import optim as _optim
from ._lib import cuda_available
from .optim import *  # noqa: F401,F403  (every optimizer class: optim.__all__)

__all__ = list(_optim.__all__) + ["cuda_available"]
