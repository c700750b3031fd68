"""nibble's step as operators in PyTorch's registry: torch.ops.nibble.step (host scalars),
torch.ops.nibble.step_device (scalars in device tensors, for CUDA graphs and GradScaler) and
torch.ops.nibble.step_device_sum (step_device whose skip and clip follow a gradient square sum in a
device tensor: sharded training, clipping over several groups). They declare the parameters they
update; nibble's state is inside the library, reached by handle."""
from __future__ import annotations

import torch

from ._handle import LIVE

_OPS = torch.library.Library("nibble", "DEF")
_OPS.define("step(int handle, Tensor(a!)[] params, float lr, float grad_scale, int found_inf) -> ()")
_OPS.define("step_device(int handle, Tensor(a!)[] params, Tensor lr, Tensor grad_scale, Tensor found_inf) -> ()")
_OPS.define("step_device_sum(int handle, Tensor(a!)[] params, Tensor lr, Tensor grad_scale, Tensor square_sum) -> ()")


def _step_host(handle: int, params: list[torch.Tensor], lr: float, grad_scale: float, found_inf: int) -> None:
    LIVE[handle].step(lr, grad_scale, found_inf)


def _step_device(handle: int, params: list[torch.Tensor], lr: torch.Tensor, grad_scale: torch.Tensor,
                 found_inf: torch.Tensor) -> None:
    LIVE[handle].step_device(lr, grad_scale, found_inf)


def _step_device_sum(handle: int, params: list[torch.Tensor], lr: torch.Tensor, grad_scale: torch.Tensor,
                     square_sum: torch.Tensor) -> None:
    LIVE[handle].step_device_with_square_sum(lr, grad_scale, square_sum)


_OPS.impl("step", _step_host, "CPU")
_OPS.impl("step", _step_host, "CUDA")
_OPS.impl("step_device", _step_device, "CUDA")
_OPS.impl("step_device_sum", _step_device_sum, "CUDA")
