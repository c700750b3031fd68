"""One optimizer of nibble's C library behind one torch parameter group: its creation from JSON
options and parameters, every call made on it through the C interface, its destruction with the
Python object, and the library's refusals as Python exceptions (ValueError for bad input), with the
hyperparameters a torch class renames called by torch's argument names."""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import tempfile
import weakref
from typing import Optional, Sequence

import torch

from . import _lib, _safetensors

DTYPES = {torch.float32: _lib.F32, torch.bfloat16: _lib.BF16, torch.float16: _lib.F16}

# The handles alive, by address: torch.ops.nibble.* receive a handle as an int and step its group.
LIVE: "weakref.WeakValueDictionary[int, GroupHandle]" = weakref.WeakValueDictionary()


def _check(code: int, algorithm: str = "", torch_names: Optional[dict[str, str]] = None) -> None:
    """_lib.check, with the library's "<algorithm>: <hyperparameter> ..." refusals naming the torch
    argument a class renamed (nibble's beta1 is torch's betas[0])."""
    try:
        _lib.check(code)
    except ValueError as e:
        message = str(e)
        for name, torch_name in (torch_names or {}).items():
            message = re.sub(rf"^({re.escape(algorithm)}): {re.escape(name)}\b", rf"\1: {torch_name} ({name})",
                             message)
        if message == str(e):
            raise
        raise ValueError(message) from None


def check_options(options: dict, torch_names: Optional[dict[str, str]] = None) -> None:
    """Raises what nibble_create would raise for `options` (nibble_check_options: no parameters,
    no device needed), or nothing."""
    _check(_lib.lib.nibble_check_options(json.dumps(options).encode()), options.get("algorithm", ""), torch_names)


class _DeviceScalar:
    """A one-element device array of nibble's, seen by torch through __cuda_array_interface__."""

    def __init__(self, address: int, typestr: str) -> None:
        self.__cuda_array_interface__ = {"shape": (1,), "typestr": typestr, "data": (address, False),
                                         "version": 3, "strides": None}


class GroupHandle:
    """One nibble optimizer behind one torch parameter group, destroyed with this object."""

    def __init__(self, options: dict, params: Sequence[torch.Tensor], device: torch.device,
                 grad_dtypes: list[torch.dtype], *, global_shapes: Sequence[Optional[torch.Size]] = (),
                 splits: Sequence[bool] = (), counted: Optional[Sequence[int]] = None,
                 torch_names: Optional[dict[str, str]] = None) -> None:
        """Creates the library's optimizer over `params` (this rank's tensors; for a DTensor its
        global shape and split flag, else None and False) with `options` (nibble's JSON options),
        on `device`. Sharded training gives `counted`: 1 for each parameter this rank counts in the
        gradient norm."""
        self.handle: Optional[int] = None
        self.device = device
        self.options = options  # everything but lr; its hyperparameters change by set_hyper
        self.torch_names = torch_names
        self.grad_dtypes = grad_dtypes
        self.grads: list[Optional[int]] = []
        self.views: Optional[dict[str, torch.Tensor]] = None
        self.key: tuple = ()
        self.identity: tuple = ()  # the parameters' objects and data addresses it was made over
        self.group_id = 0  # id() of the torch parameter group it steps
        self.ahead = False  # created before the first step (sharded): its settings may still change
        self.counted = None if counted is None else (ctypes.c_uint8 * max(len(counted), 1))(*counted)
        self.counted_len = 0 if counted is None else len(counted)
        structs = (_lib.NibbleParam * max(len(params), 1))()
        shapes = []
        for i, p in enumerate(params):
            if grad_dtypes[i] not in DTYPES:
                raise ValueError(f"gradients must be float32, bfloat16 or float16, got {grad_dtypes[i]}")
            shapes.append((ctypes.c_int64 * max(p.dim(), 1))(*p.shape))
            structs[i] = _lib.NibbleParam(f"param.{i}".encode(), p.dim(), shapes[-1], p.data_ptr(), None,
                                          DTYPES[p.dtype], DTYPES[grad_dtypes[i]])
            if i < len(global_shapes) and global_shapes[i] is not None:
                shapes.append((ctypes.c_int64 * max(p.dim(), 1))(*global_shapes[i]))
                structs[i].global_shape = shapes[-1]
                structs[i].split = int(splits[i])
        handle = ctypes.c_void_p()
        text = json.dumps(options).encode()
        create = lambda: _check(_lib.lib.nibble_create(text, structs, len(params), ctypes.byref(handle)),  # noqa: E731
                                options.get("algorithm", ""), torch_names)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            try:
                create()
            except MemoryError:
                if device.type != "cuda":
                    raise
                # nibble allocates its state with cudaMalloc, outside PyTorch's caching allocator,
                # which may be holding freed blocks (the first step comes after a backward pass).
                torch.cuda.empty_cache()
                create()
        self.handle = handle.value

    def __del__(self) -> None:
        if getattr(self, "handle", None):
            _lib.lib.nibble_destroy(self.handle)
            self.handle = None

    def register(self) -> None:
        """Makes this handle reachable by torch.ops.nibble.* (for as long as it lives)."""
        LIVE[self.handle] = self

    def stream(self) -> Optional[ctypes.c_void_p]:
        """torch's current stream on a CUDA group's device (None on the CPU)."""
        if self.device.type != "cuda":
            return None
        return ctypes.c_void_p(torch.cuda.current_stream(self.device).cuda_stream)

    def scalars(self) -> dict[str, torch.Tensor]:
        """The library's device scalars (lr_scale, grad_scale, found_inf, and the last step's
        grad_norm, a float64) as torch tensors viewing them."""
        if self.views is None:
            lr, scale, inf, steps, norm = (ctypes.c_void_p() for _ in range(5))
            _lib.check(_lib.lib.nibble_device_scalars(self.handle, ctypes.byref(lr), ctypes.byref(scale),
                                                       ctypes.byref(inf), ctypes.byref(steps)))
            _lib.check(_lib.lib.nibble_device_grad_norm(self.handle, ctypes.byref(norm)))
            view = lambda ptr, t: torch.as_tensor(_DeviceScalar(ptr.value, t), device=self.device)  # noqa: E731
            self.views = {"lr_scale": view(lr, "<f4"), "grad_scale": view(scale, "<f4"),
                          "found_inf": view(inf, "<i4"), "grad_norm": view(norm, "<f8")}
        return self.views

    def set_grads(self, grads: list[Optional[int]]) -> None:
        """Hands the gradients' addresses (None: no gradient) to the library when they changed."""
        if grads != self.grads:
            array = (ctypes.c_void_p * max(len(grads), 1))(*grads)
            # NOTE: on CUDA the table upload goes to torch's current stream, the one the step is
            # queued on next; on the optimizer's previous stream the two would be unordered.
            _lib.check(_lib.lib.nibble_set_grads(self.handle, array, len(grads), self.stream()))
            self.grads = grads

    def step(self, lr: float, grad_scale: float, found_inf: int) -> None:
        _lib.check(_lib.lib.nibble_step(self.handle, grad_scale, lr, found_inf, self.stream(), None, None, None))

    def step_device(self, lr: torch.Tensor, grad_scale: torch.Tensor, found_inf: torch.Tensor) -> None:
        """Queues a step on the current stream with its scalars copied from device tensors."""
        views = self.scalars()
        views["lr_scale"].copy_(lr.reshape(1))
        views["grad_scale"].copy_(grad_scale.reshape(1))
        views["found_inf"].copy_(found_inf.reshape(1))
        _lib.check(_lib.lib.nibble_enqueue_step(self.handle, self.stream()))

    def enqueue_grad_square_sum(self, out: torch.Tensor) -> None:
        """CUDA: queues on the current stream the squared norm of the gradients this rank counts
        into `out`, one float64 element on the group's device; nothing waits for it."""
        _lib.check(_lib.lib.nibble_enqueue_grad_square_sum(self.handle, self.counted, self.counted_len,
                                                            ctypes.c_void_p(out.data_ptr()), self.stream()))

    def step_device_with_square_sum(self, lr: torch.Tensor, grad_scale: torch.Tensor,
                                    square_sum: torch.Tensor) -> None:
        """CUDA: step_device whose skip and clip follow `square_sum` (a float64 element on the
        device, summed over every group and rank, a found_inf folded in as inf), read when the
        step runs."""
        views = self.scalars()
        views["lr_scale"].copy_(lr.reshape(1))
        views["grad_scale"].copy_(grad_scale.reshape(1))
        views["found_inf"].zero_()
        _lib.check(_lib.lib.nibble_enqueue_step_with_square_sum(self.handle, ctypes.c_void_p(square_sum.data_ptr()),
                                                                 self.stream()))

    def grad_square_sum(self) -> float:
        """The squared norm of the gradients this rank counts (all of them unless `counted`)."""
        part = ctypes.c_double()
        _lib.check(_lib.lib.nibble_grad_square_sum(self.handle, self.counted, self.counted_len, ctypes.byref(part)))
        return part.value

    def step_with_square_sum(self, grad_scale: float, lr: float, square_sum: float) -> float:
        """A CPU step whose skip and clip follow `square_sum` (summed over every group and rank);
        returns the gradient norm."""
        norm = ctypes.c_double(float("nan"))
        _lib.check(_lib.lib.nibble_step_with_square_sum(self.handle, grad_scale, lr, 0, square_sum, None,
                                                         ctypes.byref(norm), None))
        return norm.value

    def counters(self) -> tuple[int, int]:
        steps, skipped = ctypes.c_int64(), ctypes.c_int64()
        _lib.check(_lib.lib.nibble_counters(self.handle, ctypes.byref(steps), ctypes.byref(skipped)))
        return steps.value, skipped.value

    def state_bytes(self) -> int:
        params, nbytes = ctypes.c_int64(), ctypes.c_int64()
        _lib.check(_lib.lib.nibble_state_bytes(self.handle, ctypes.byref(params), ctypes.byref(nbytes)))
        return nbytes.value

    def save(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The library's state file, as CPU tensors and its metadata."""
        fd, path = tempfile.mkstemp(suffix=".safetensors", prefix="nibble-state-")
        os.close(fd)
        try:
            _lib.check(_lib.lib.nibble_save(self.handle, path.encode()))
            return _safetensors.read(path)
        finally:
            os.unlink(path)

    def load(self, path: str) -> None:
        """Replaces the state with a state file's, which the library checks first."""
        _lib.check(_lib.lib.nibble_load(self.handle, path.encode()))

    def state_values(self, index: int, name: str, out: torch.Tensor) -> None:
        """Writes state `name` of parameter `index`, dequantized, into the fp32 CPU tensor `out`."""
        _lib.check(_lib.lib.nibble_state_values(self.handle, index, name.encode(), out.data_ptr(), out.numel()))

    def set_state_values(self, index: int, name: str, values: torch.Tensor) -> None:
        """Sets state `name` of parameter `index` from the contiguous fp32 CPU tensor `values`."""
        _lib.check(_lib.lib.nibble_set_state_values(self.handle, index, name.encode(), values.data_ptr(),
                                                    values.numel()))

    def set_step_counts(self, tensor_steps: list[int], steps: int, skipped: int) -> None:
        array = (ctypes.c_int64 * max(len(tensor_steps), 1))(*tensor_steps)
        _lib.check(_lib.lib.nibble_set_step_counts(self.handle, array, len(tensor_steps), steps, skipped))

    def set_running_sums(self, lr_max: list[float], weight_sum: list[float]) -> None:
        """Schedule-free AdamW: each parameter's lr_max and weight_sum (doubles)."""
        count = len(lr_max)
        arrays = [(ctypes.c_double * max(count, 1))(*values) for values in (lr_max, weight_sum)]
        _lib.check(_lib.lib.nibble_set_running_sums(self.handle, arrays[0], arrays[1], count))

    def set_mode(self, train: bool) -> None:
        """Schedule-free AdamW: the parameters to y (train) or to the average x (eval)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        _lib.check((_lib.lib.nibble_train if train else _lib.lib.nibble_eval)(self.handle))

    def set_hyper(self, values: dict) -> None:
        """Changes these hyperparameters (nibble's names) for later steps; the state stays. On CUDA
        the change is ordered on torch's current stream, before the step queued next."""
        _check(_lib.lib.nibble_set_hyper(self.handle, json.dumps(values).encode(), self.stream()),
               self.options.get("algorithm", ""), self.torch_names)

    def training(self) -> bool:
        train = ctypes.c_int32()
        _lib.check(_lib.lib.nibble_training(self.handle, ctypes.byref(train)))
        return bool(train.value)

    def update_hessian(self, estimates: list[Optional[torch.Tensor]]) -> None:
        """Folds one fp32 estimate per parameter (None skips it) into SophiaG's Hessian EMA."""
        array = (ctypes.c_void_p * max(len(estimates), 1))(*[None if e is None else e.data_ptr() for e in estimates])
        # On CUDA the update goes to torch's current stream, the one that computed the estimates.
        _lib.check(_lib.lib.nibble_update_hessian(self.handle, array, len(estimates), self.stream()))
