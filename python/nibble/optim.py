"""nibble's optimizers as torch.optim.Optimizer subclasses: SGD, Adam, AdamW, Lion, Adafactor,
AdamP, QHM and SophiaG with state at fp32, bf16, 8-bit or 4-bit, stepped by nibble's C++/CUDA
library in one call per parameter group (no per-parameter Python loop, no synchronisation)."""
from __future__ import annotations

import collections
import ctypes
import functools
import json
import os
import struct
import tempfile
import weakref
from typing import Any, Callable, Iterable, Optional

import torch

from . import _lib

PRECISIONS = ("fp32", "bf16", "8bit", "4bit")
_DTYPES = {torch.float32: _lib.F32, torch.bfloat16: _lib.BF16, torch.float16: _lib.F16}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "U8": torch.uint8, "I64": torch.int64}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class _DeviceScalar:
    """A one-element device array of nibble's, seen by torch through __cuda_array_interface__."""

    def __init__(self, address: int, typestr: str) -> None:
        self.__cuda_array_interface__ = {"shape": (1,), "typestr": typestr, "data": (address, False),
                                         "version": 3, "strides": None}


@functools.lru_cache(maxsize=None)
def _dtensor_class() -> Optional[type]:
    """torch's DTensor, or None where this torch has no torch.distributed."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def _is_dtensor(t: Any) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor (the tensor itself otherwise), sharing its storage."""
    return t.to_local() if _is_dtensor(t) else t


def _layout(p: torch.Tensor) -> tuple[bool, bool]:
    """(split, counted) of a DTensor parameter: whether other ranks of its mesh hold other elements
    of it (torch shards dimension d of size n into pieces of ceil(n / ranks) elements, so fewer
    pieces than ranks may hold anything), and whether this rank counts it in the gradient norm (a
    replicated tensor is counted by the first rank of each mesh dimension it is replicated over)."""
    shape = list(p.shape)
    split, counted = False, True
    mesh = p.device_mesh
    coordinate = mesh.get_coordinate()
    for dim, placement in enumerate(p.placements):
        ranks = mesh.size(dim)
        if placement.is_shard():
            d = placement.dim % max(len(shape), 1)
            n = shape[d]
            if ranks > 1 and n > 0:
                piece = -(-n // ranks)
                split = split or -(-n // piece) > 1
                shape[d] = piece
        elif placement.is_replicate():
            counted = counted and (coordinate is None or coordinate[dim] == 0)
        else:
            raise ValueError(f"a DTensor parameter has placement {placement}; nibble steps Shard and Replicate "
                             "parameters")
    return split, counted


class _StateView(collections.defaultdict):
    """torch's `optimizer.state`. nibble keeps its state inside the library, so this stays empty,
    but it is true once the library holds state: torch.distributed.checkpoint's state-dict helpers
    take a step with zero gradients and lr 0 on an optimizer whose `state` is false, which would
    decay nibble's moments and count a step. An entry assigned to `state[param]` (one of
    state_dict()'s per-parameter entries) is loaded into the library before the next step or
    state read (NibbleOptimizer._load_assigned), and the view is empty again."""

    holds_state = False

    def __bool__(self) -> bool:
        return self.holds_state or len(self) > 0


class _Group:
    """One nibble optimizer behind one torch parameter group."""

    def __init__(self, handle: int, device: torch.device, options: dict, grad_dtypes: list[torch.dtype]) -> None:
        self.handle = handle
        self.device = device
        self.options = options  # everything but lr, fixed at creation
        self.grad_dtypes = grad_dtypes
        self.grads: list[int] = []
        self.views: Optional[dict[str, torch.Tensor]] = None
        self.key: tuple = ()
        self.ahead = False  # created before the first step (sharded): its settings may still change
        # Sharded training: which parameters this rank counts in the gradient norm (uint8 flags).
        self.counted: Optional[ctypes.Array] = None

    def scalars(self) -> dict[str, torch.Tensor]:
        if self.views is None:
            lr, scale, inf, steps = (ctypes.c_void_p() for _ in range(4))
            _lib.check(_lib.lib.nibble_device_scalars(self.handle, ctypes.byref(lr), ctypes.byref(scale),
                                                       ctypes.byref(inf), ctypes.byref(steps)))
            view = lambda ptr, t: torch.as_tensor(_DeviceScalar(ptr.value, t), device=self.device)  # noqa: E731
            self.views = {"lr_scale": view(lr, "<f4"), "grad_scale": view(scale, "<f4"),
                          "found_inf": view(inf, "<i4")}
        return self.views

    def __del__(self) -> None:
        if getattr(self, "handle", None):
            _lib.lib.nibble_destroy(self.handle)
            self.handle = None


def _number(name: str, value: Any, low: float = 0.0, high: Optional[float] = None, open_high: bool = False) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not value == value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < low or (high is not None and (value >= high if open_high else value > high)):
        bound = f"[{low}, {high})" if open_high else (f"[{low}, {high}]" if high is not None else f">= {low}")
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def _betas(name: str, betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{name} must be a pair of numbers, got {betas!r}")
    return (_number(f"{name}[0]", betas[0], 0.0, 1.0, True), _number(f"{name}[1]", betas[1], 0.0, 1.0, True))


class NibbleOptimizer(torch.optim.Optimizer):
    """Base of nibble's optimizers. Subclasses name the algorithm and map a parameter group's
    hyperparameters (PyTorch's names) to nibble's."""

    algorithm = ""
    default_precision = "fp32"
    # torch.amp.GradScaler hands over grad_scale and found_inf instead of unscaling the gradients.
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable, defaults: dict, *, precision: Optional[str], block_size: int,
                 min_quant_size: int, master_weights: bool, stochastic_rounding: bool, seed: int,
                 max_grad_norm: float = 0.0) -> None:
        precision = self.default_precision if precision is None else precision
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 0:
            raise ValueError(f"block_size must be 0 (the default) or a power of two in [16, 4096], got {block_size!r}")
        if block_size and (block_size < 16 or block_size > 4096 or block_size & (block_size - 1)):
            raise ValueError(f"block_size must be 0 (the default) or a power of two in [16, 4096], got {block_size}")
        if isinstance(min_quant_size, bool) or not isinstance(min_quant_size, int) or min_quant_size < 0:
            raise ValueError(f"min_quant_size must be an integer >= 0, got {min_quant_size!r}")
        max_grad_norm = _number("max_grad_norm", max_grad_norm)
        defaults = dict(defaults, precision=precision)
        self._settings = {"block_size": block_size, "min_quant_size": min_quant_size, "master_weights": master_weights,
                          "stochastic_rounding": stochastic_rounding, "seed": int(seed)}
        if max_grad_norm > 0:
            self._settings["max_grad_norm"] = max_grad_norm
        self._groups: dict[int, _Group] = {}
        self._mesh: Any = None  # the device mesh of DTensor parameters: set, the optimizer is sharded
        self._constructed = False
        self.last_grad_norm = float("nan")
        super().__init__(params, defaults)  # validates every group in add_param_group
        self.state = _StateView(dict)
        self._constructed = True
        self._check_devices()
        self._create_sharded()

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, then nibble's checks; a refused group leaves the optimizer as
        it was."""
        mesh = self._mesh
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        try:
            self._check_group(self.param_groups[index])
            self._check_layout(index, self.param_groups[index])
            if self._constructed:
                self._check_devices()
                self._create_sharded()
        except Exception:
            self.param_groups.pop()
            self._groups.pop(index, None)
            self._mesh = mesh
            raise

    def _check_layout(self, index: int, group: dict) -> None:
        """DTensor parameters: one device mesh for the whole optimizer, and no plain tensors in
        their group."""
        params = group["params"]
        sharded = [i for i, p in enumerate(params) if _is_dtensor(p)]
        if not sharded:
            return
        if len(sharded) != len(params):
            plain = next(i for i, p in enumerate(params) if not _is_dtensor(p))
            raise ValueError(f"parameter group {index} mixes DTensor parameters (parameter {sharded[0]}) with plain "
                             f"tensors (parameter {plain}); nibble steps a group as one sharded layout, so give the "
                             "plain tensors a group of their own")
        mesh = params[sharded[0]].device_mesh
        for i in sharded:
            if params[i].device_mesh != mesh:
                raise ValueError(f"parameter group {index}: parameter {i} is on device mesh {params[i].device_mesh}, "
                                 f"parameter {sharded[0]} on {mesh}; a group's DTensors must share one mesh")
            _layout(params[i])
        if self._mesh is not None and self._mesh != mesh:
            raise ValueError(f"parameter group {index} is on device mesh {mesh}, an earlier group on {self._mesh}; "
                             "one nibble optimizer steps the parameters of one mesh")
        if mesh.ndim != 1 and mesh.size() != torch.distributed.get_world_size():
            raise ValueError(f"parameter group {index} is on device mesh {mesh}: nibble reduces the gradient norm "
                             "over a one-dimensional mesh or one that spans every rank")
        self._mesh = mesh

    def _check_devices(self) -> None:
        devices = {p.device.type for group in self.param_groups for p in group["params"]}
        if self._mesh is not None and devices - {"cpu"}:
            raise ValueError("nibble steps sharded (DTensor) parameters on the CPU only so far (gloo); got parameters "
                             f"on {sorted(devices)}")
        if self._settings.get("max_grad_norm") and "cuda" in devices and \
                sum(1 for group in self.param_groups if group["params"]) > 1:
            raise ValueError("max_grad_norm with CUDA parameters clips each parameter group by its own norm; put the "
                             "parameters in one group, or clip with torch.nn.utils.clip_grad_norm_")

    def _create_sharded(self) -> None:
        """A sharded optimizer creates nibble's state at once, so that a layout nibble refuses
        (e.g. a split tensor under Adafactor) is refused here, on every rank alike."""
        if self._mesh is None:
            return
        with torch.no_grad():
            for index, group in enumerate(self.param_groups):
                if group["params"] and index not in self._groups:
                    self._nibble(index).ahead = True

    # -- what subclasses provide ----------------------------------------------------------------

    def _hyper(self, group: dict) -> dict:
        raise NotImplementedError

    def _check_group(self, group: dict) -> None:
        """Validates a group's hyperparameters; raises ValueError naming the bad one."""
        if group["precision"] not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {group['precision']!r}")
        if group.get("lr") is not None:
            _number("lr", group["lr"])
        self._hyper(group)
        for p in group["params"]:
            if p.dtype not in _DTYPES:
                raise ValueError(f"parameters must be float32, bfloat16 or float16, got {p.dtype}")
            if not p.is_contiguous():
                raise ValueError("parameters must be contiguous; got one with strides " + str(p.stride()))
            if p.device.type not in ("cpu", "cuda"):
                raise ValueError(f"parameters must be on cpu or cuda, got {p.device}")

    def _lr(self, group: dict) -> Any:
        return group["lr"]

    # -- the nibble optimizer of a group --------------------------------------------------------

    def _options(self, group: dict, device: torch.device) -> dict:
        hyper = self._hyper(group)
        hyper["lr"] = 1.0  # the group's lr arrives every step as lr_scale, so schedulers cost nothing
        return {"algorithm": self.algorithm, "precision": group["precision"], "device": device.type,
                "hyper": hyper, **self._settings}

    @staticmethod
    def _fixed_key(group: dict) -> tuple:
        """The group's settings that must not change after its first step (everything but lr),
        hashable, so that a step compares them without rebuilding nibble's options."""
        freeze = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
        return tuple((k, freeze(v)) for k, v in group.items() if k not in ("params", "lr"))

    def _nibble(self, index: int) -> _Group:
        group = self.param_groups[index]
        existing = self._groups.get(index)
        key = self._fixed_key(group)
        if existing is not None and existing.key == key:
            return existing
        if existing is not None and existing.ahead:
            existing = None
        if existing is not None:
            options = self._options(group, existing.device)
            if existing.options != options:
                raise ValueError(f"parameter group {index}: only lr may change after the first step; "
                                 f"{self._changed(existing.options, options)} changed")
            existing.key = key
            return existing
        made = self._create(index, group)
        self._register(index, made)
        return made

    def _register(self, index: int, made: _Group) -> None:
        _LIVE[made.handle] = made
        self._groups[index] = made
        self.state.holds_state = True

    def _create(self, index: int, group: dict) -> _Group:
        """A new nibble optimizer for `group` (zero state), not yet the one behind group `index`."""
        key = self._fixed_key(group)
        params = group["params"]
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"parameter group {index} holds parameters on several devices: {sorted(map(str, devices))}")
        device = next(iter(devices)) if devices else torch.device("cpu")
        options = self._options(group, device)
        grad_dtypes = [p.grad.dtype if p.grad is not None else (p.dtype if p.dtype != torch.float32 else torch.float32)
                       for p in params]
        structs = (_lib.NibbleParam * max(len(params), 1))()
        shapes = []
        counted = []
        for i, p in enumerate(params):
            local = _local(p)
            shape = (ctypes.c_int64 * max(p.dim(), 1))(*local.shape)
            shapes.append(shape)
            if grad_dtypes[i] not in _DTYPES:
                raise ValueError(f"gradients must be float32, bfloat16 or float16, got {grad_dtypes[i]}")
            structs[i] = _lib.NibbleParam(f"param.{i}".encode(), p.dim(), shape, local.data_ptr(), None,
                                          _DTYPES[p.dtype], _DTYPES[grad_dtypes[i]])
            if _is_dtensor(p):
                split, count = _layout(p)
                shapes.append((ctypes.c_int64 * max(p.dim(), 1))(*p.shape))
                structs[i].global_shape = shapes[-1]
                structs[i].split = int(split)
            else:
                # A plain tensor beside sharded ones is taken as replicated over the mesh.
                coordinate = self._mesh.get_coordinate() if self._mesh is not None else None
                count = coordinate is None or all(c == 0 for c in coordinate)
            counted.append(int(count))
        handle = ctypes.c_void_p()
        text = json.dumps(options).encode()
        with torch.cuda.device(device) if device.type == "cuda" else _nullcontext():
            try:
                _lib.check(_lib.lib.nibble_create(text, structs, len(params), ctypes.byref(handle)))
            except MemoryError:
                if device.type != "cuda":
                    raise
                # nibble allocates its state with cudaMalloc, outside PyTorch's caching allocator,
                # which may be holding freed blocks (the first step comes after a backward pass).
                torch.cuda.empty_cache()
                _lib.check(_lib.lib.nibble_create(text, structs, len(params), ctypes.byref(handle)))
        made = _Group(handle.value, device, options, grad_dtypes)
        made.key = key
        if self._mesh is not None:
            made.counted = (ctypes.c_uint8 * max(len(counted), 1))(*counted)
        return made

    @staticmethod
    def _changed(old: dict, new: dict) -> str:
        keys = [k for k in new if k != "hyper" and old.get(k) != new.get(k)]
        keys += [k for k in new["hyper"] if old["hyper"].get(k) != new["hyper"].get(k)]
        return ", ".join(keys)

    def _set_grads(self, index: int, made: _Group) -> None:
        grads = []
        for i, p in enumerate(self.param_groups[index]["params"]):
            g = None if p.grad is None else _local(p.grad)
            if g is None:
                grads.append(None)
                continue
            if g.is_sparse:
                raise ValueError("nibble optimizers do not take sparse gradients")
            if g.dtype != made.grad_dtypes[i]:
                raise ValueError(f"parameter {i} of group {index}: gradient dtype {g.dtype} differs from "
                                 f"{made.grad_dtypes[i]}, the one its first step saw")
            if not g.is_contiguous():
                raise ValueError(f"parameter {i} of group {index}: the gradient is not contiguous")
            grads.append(g.data_ptr())
        if grads != made.grads:
            array = (ctypes.c_void_p * max(len(grads), 1))(*grads)
            # NOTE: on CUDA the table upload goes to torch's current stream, the one the step is
            # queued on next; on the optimizer's previous stream the two would be unordered.
            _lib.check(_lib.lib.nibble_set_grads(made.handle, array, len(grads), _current_stream(made)))
            made.grads = grads

    # -- torch.optim.Optimizer ------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if len(self.state):
            self._load_assigned()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if self._mesh is not None or (self._settings.get("max_grad_norm") and self._on_cpu()):
            self._step_with_norm(grad_scale, found_inf)
            return loss
        for index, group in enumerate(self.param_groups):
            if not group["params"]:
                continue
            made = self._nibble(index)
            self._set_grads(index, made)
            lr = self._lr(group)
            if made.device.type == "cpu":
                scale = 1.0 if grad_scale is None else float(grad_scale)
                inf = 0 if found_inf is None else int(float(found_inf) != 0.0)
                torch.ops.nibble.step(made.handle, group["params"], float(lr), scale, inf)
                continue
            if not any(isinstance(x, torch.Tensor) for x in (lr, grad_scale, found_inf)):
                torch.ops.nibble.step(made.handle, group["params"], float(lr), 1.0, 0)
                continue
            # Tensors (a capturable lr, GradScaler's scale and found_inf) are copied on the device,
            # so nothing waits for them and a CUDA graph captures the copies.
            device_tensor = lambda x, default: (x if isinstance(x, torch.Tensor)  # noqa: E731
                                                else torch.full((), default if x is None else float(x),
                                                                dtype=torch.float32, device=made.device))
            torch.ops.nibble.step_device(made.handle, group["params"], device_tensor(lr, 0.0),
                                         device_tensor(grad_scale, 1.0), device_tensor(found_inf, 0.0))
        return loss

    def _on_cpu(self) -> bool:
        return all(p.device.type == "cpu" for group in self.param_groups for p in group["params"])

    def _step_with_norm(self, grad_scale: Any, found_inf: Any) -> None:
        """The CPU step of a sharded optimizer, or one that clips: the squared gradient norm of
        every group, summed over the ranks by one all-reduce (sharded), decides the skip and the
        clip of every group on every rank alike. A GradScaler's found_inf on any rank skips all."""
        stepping = []
        total = 0.0
        for index, group in enumerate(self.param_groups):
            if not group["params"]:
                continue
            made = self._nibble(index)
            self._set_grads(index, made)
            part = ctypes.c_double()
            flags = len(group["params"]) if made.counted is not None else 0
            _lib.check(_lib.lib.nibble_grad_square_sum(made.handle, made.counted, flags, ctypes.byref(part)))
            total += part.value
            stepping.append((made, group))
        if found_inf is not None and float(found_inf) != 0.0:
            total = float("inf")
        if self._mesh is not None:
            mesh = self._mesh
            reduced = torch.tensor([total], dtype=torch.float64, device="cpu")
            torch.distributed.all_reduce(reduced, group=mesh.get_group() if mesh.ndim == 1 else None)
            total = reduced.item()
        scale = 1.0 if grad_scale is None else float(grad_scale)
        norm = ctypes.c_double(float("nan"))
        for made, group in stepping:
            _lib.check(_lib.lib.nibble_step_with_square_sum(made.handle, scale, float(self._lr(group)), 0, total,
                                                             None, ctypes.byref(norm), None))
            made.ahead = False
        self.last_grad_norm = norm.value

    def counters(self) -> list[tuple[int, int]]:
        """(steps taken, steps skipped) per parameter group that has stepped."""
        if len(self.state):
            self._load_assigned()
        out = []
        for index in sorted(self._groups):
            steps, skipped = ctypes.c_int64(), ctypes.c_int64()
            _lib.check(_lib.lib.nibble_counters(self._groups[index].handle, ctypes.byref(steps), ctypes.byref(skipped)))
            out.append((steps.value, skipped.value))
        return out

    def state_bytes(self) -> int:
        """Bytes of optimizer state nibble holds (codes, scales and full-precision state)."""
        if len(self.state):
            self._load_assigned()
        total = 0
        for index in range(len(self.param_groups)):
            if not self.param_groups[index]["params"]:
                continue
            params, nbytes = ctypes.c_int64(), ctypes.c_int64()
            _lib.check(_lib.lib.nibble_state_bytes(self._nibble(index).handle, ctypes.byref(params), ctypes.byref(nbytes)))
            total += nbytes.value
        return total

    def state_dict(self) -> dict:
        """PyTorch's layout: {"state": {param index: {"step", "exp_avg", ...}}, "param_groups": [...]}.
        Quantized state appears as uint8 "<name>.codes" plus float32 "<name>.absmax" (or
        "row_max"/"col_max"); every tensor is on the CPU, so the dict loads on any device.
        A sharded optimizer's state is DTensors shaped like the parameters (see _sharded_state_dict)."""
        if len(self.state):
            self._load_assigned()
        return self._state_dict()

    def _state_dict(self) -> dict:
        if self._mesh is not None:
            return self._sharded_state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        groups = []
        first = 0
        for index, group in enumerate(self.param_groups):
            saved = {k: v for k, v in group.items() if k != "params"}
            count = len(group["params"])
            saved["params"] = list(range(first, first + count))
            if count:
                tensors, metadata = _save(self._nibble(index).handle)
                saved["nibble"] = metadata
                saved["nibble_codebooks"] = {k: v for k, v in tensors.items() if k.startswith("codebook.")}
                steps = tensors["steps"]
                for i in range(count):
                    entry: dict[str, torch.Tensor] = {"step": steps[i].to(torch.float32)}
                    prefix = f"state.{i}."
                    for name, t in tensors.items():
                        if name.startswith(prefix):
                            entry[name[len(prefix):]] = t
                    state[first + i] = entry
            groups.append(saved)
            first += count
        return {"state": state, "param_groups": groups}

    # NOTE: the layout of a sharded checkpoint. Every per-parameter entry is a DTensor on the
    # parameter's mesh with its placements and its GLOBAL shape, so torch.distributed.checkpoint
    # cuts and joins it for any world size like the model's own weights; the only other entries are
    # plain tensors that are the same on every rank ("step", and Adafactor's factors of replicated
    # tensors). Quantized slots are stored as their dequantized fp32 values: their codes would
    # reshard, but the per-block absmax belongs to blocks that start where each rank's shard starts,
    # and FSDP2's ceil-division shards (uneven rows, 4-bit pairs, blocks wider than a shard) move
    # those starts with the world size, so no single global layout of absmax exists. Loading
    # re-quantizes block by block on each rank. The values are written so that the same blocks give
    # back the same codes and absmax (read_slot_portable in the library): resuming at the same world
    # size, or at one whose shards start on the same block boundaries, is exact; elsewhere each
    # value moves by at most the codec's round-trip error (half a code gap times the new block's
    # absmax). The price is a checkpoint of 4 bytes per element per quantized slot, like
    # torch.optim.AdamW's, while training memory stays quantized.

    def _sharded_state_dict(self) -> dict:
        """The state of a sharded optimizer, for torch.distributed.checkpoint (DCP): per parameter
        "step" and one DTensor per state tensor (exp_avg, exp_avg_sq, master, ...) shaped like the
        parameter, quantized state dequantized to fp32; each group's "nibble" section names the
        format, the algorithm, the step counts and every parameter's global shape and state names."""
        state: dict[int, dict[str, torch.Tensor]] = {}
        groups = []
        first = 0
        for index, group in enumerate(self.param_groups):
            saved = {k: v for k, v in group.items() if k != "params"}
            count = len(group["params"])
            saved["params"] = list(range(first, first + count))
            if count:
                made = self._nibble(index)
                tensors, metadata = _save(made.handle)
                layout = json.loads(metadata["layout"])
                described = []
                for i, p in enumerate(group["params"]):
                    names = _state_names(layout[i])
                    entry: dict[str, torch.Tensor] = {"step": tensors["steps"][i].to(torch.float32)}
                    for name in names:
                        entry[name] = self._sharded_entry(made, index, i, p, name, layout[i], tensors)
                    state[first + i] = entry
                    described.append({"shape": list(p.shape), "precision": layout[i]["precision"], "state": names})
                saved["nibble"] = {"format": _SHARDED_FORMAT, "algorithm": metadata["algorithm"],
                                   "step": metadata["step"], "skipped": metadata["skipped"],
                                   "layout": json.dumps(described)}
            groups.append(saved)
            first += count
        return {"state": state, "param_groups": groups}

    @staticmethod
    def _sharded_entry(made: _Group, index: int, i: int, p: torch.Tensor, name: str, layout: dict,
                       tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        local = _local(p)
        if name in ("exp_avg_sq_row", "exp_avg_sq_col"):
            # Factored Adafactor runs only on tensors that no rank splits; replicated ones hold the
            # same factors on every rank.
            if _is_dtensor(p) and not all(pl.is_replicate() for pl in p.placements):
                raise NotImplementedError(f"state_dict(): parameter {i} of group {index} keeps factored Adafactor "
                                          f"state while sharded {list(p.placements)}; checkpoint it replicated")
            return tensors[f"state.{i}.{name}"]
        if f"state.{i}.{name}" in tensors:  # fp32 or bf16: exactly as held
            values = tensors[f"state.{i}.{name}"].reshape(local.shape)
        else:
            values = torch.empty(local.shape, dtype=torch.float32)
            _lib.check(_lib.lib.nibble_state_values(made.handle, i, name.encode(), values.data_ptr(), values.numel()))
        if not _is_dtensor(p):
            return values
        from torch.distributed.tensor import DTensor
        return DTensor.from_local(values, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())

    def _load_sharded(self, state_dict: dict, groups: list) -> None:
        """Checks the whole sharded state against this optimizer, builds each group's nibble
        optimizer anew from it, and only then swaps them in: a refused state changes nothing."""
        updated = []
        for index, (saved, group) in enumerate(zip(groups, self.param_groups)):
            merged = dict(group)
            merged.update({k: v for k, v in saved.items() if k not in ("params", "nibble")})
            self._check_group(merged)
            updated.append(merged)
        fresh: dict[int, _Group] = {}
        for index, (saved, group) in enumerate(zip(groups, updated)):
            if not group["params"]:
                continue
            meta = saved.get("nibble")
            if not isinstance(meta, dict) or meta.get("format") != _SHARDED_FORMAT:
                found = meta.get("format") if isinstance(meta, dict) else None
                raise ValueError(f"parameter group {index}: the state_dict is not a sharded nibble state (format "
                                 f"{found!r}, expected {_SHARDED_FORMAT!r}); a sharded optimizer loads the state_dict "
                                 "of a sharded one (any world size), e.g. through torch.distributed.checkpoint")
            if meta.get("algorithm") != self.algorithm:
                raise ValueError(f"parameter group {index}: the state_dict holds {meta.get('algorithm')!r} state, this "
                                 f"optimizer runs {self.algorithm!r}")
            described = json.loads(meta["layout"])
            if len(described) != len(group["params"]):
                raise ValueError(f"parameter group {index}: the state_dict describes {len(described)} parameters, "
                                 f"this optimizer's group holds {len(group['params'])}")
            made = self._create(index, group)
            live = json.loads(_save(made.handle)[1]["layout"])
            tensor_steps = []
            for i, (key, p) in enumerate(zip(saved["params"], group["params"])):
                where = f"parameter {key!r} (group {index}, position {i})"
                if list(described[i]["shape"]) != list(p.shape):
                    raise ValueError(f"{where}: the state_dict's global shape is {described[i]['shape']}, this "
                                     f"optimizer's parameter has {list(p.shape)}")
                names = _state_names(live[i])
                if described[i]["state"] != names:
                    raise ValueError(f"{where}: the state_dict holds state {described[i]['state']}, this optimizer "
                                     f"keeps {names}")
                entry = state_dict.get("state", {}).get(key)
                if not isinstance(entry, dict):
                    raise ValueError(f"{where}: the state_dict has no state for it")
                for name in ["step"] + names:
                    if name not in entry or not isinstance(entry[name], torch.Tensor):
                        raise ValueError(f"{where}: the state_dict has no tensor {name!r}")
                tensor_steps.append(int(entry["step"].item()))
                for name in names:
                    t = entry[name]
                    if _is_dtensor(t) and list(t.shape) != list(p.shape):
                        raise ValueError(f"{where}: state {name!r} has global shape {list(t.shape)}, the parameter "
                                         f"{list(p.shape)}")
                    values = _local(t).detach().to(device="cpu", dtype=torch.float32).contiguous()
                    _lib.check(_lib.lib.nibble_set_state_values(made.handle, i, name.encode(), values.data_ptr(),
                                                                values.numel()))
            steps = (ctypes.c_int64 * max(len(tensor_steps), 1))(*tensor_steps)
            _lib.check(_lib.lib.nibble_set_step_counts(made.handle, steps, len(tensor_steps),
                                                       _count(meta, "step"), _count(meta, "skipped")))
            fresh[index] = made
        # Everything checked and loaded: the groups take the saved hyperparameters and the state.
        for index, merged in enumerate(updated):
            self.param_groups[index].update({k: v for k, v in merged.items() if k != "params"})
            self._groups.pop(index, None)
        for index, made in fresh.items():
            made.key = self._fixed_key(self.param_groups[index])
            self._register(index, made)

    def _load_assigned(self) -> None:
        """Loads the entries assigned to `optimizer.state[param]` into nibble's state. torch's
        ZeroRedundancyOptimizer restores a checkpoint that way: its load_state_dict writes each of
        this rank's entries of the consolidated state_dict (the per-parameter entries of nibble's
        state_dict()) into the local optimizer's `state` and never calls the local load_state_dict.
        The other parameters keep their state; each group's step count becomes at least the
        largest per-parameter step. Empty entries (left by reading `state[param]`) are dropped. On
        a refusal the entries stay, so every later step refuses too rather than train without them."""
        assigned = [(p, entry) for p, entry in self.state.items() if not (isinstance(entry, dict) and not entry)]
        if not assigned:
            self.state.clear()
            return
        if self._mesh is not None:
            raise ValueError(f"optimizer.state was assigned state for {len(assigned)} parameter(s) of a sharded "
                             "(DTensor) optimizer, which nibble does not read from there; load a sharded state with "
                             "load_state_dict (e.g. through torch.distributed.checkpoint)")
        where = {}
        first = 0
        for index, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                where[id(p)] = (first + i, index, i)
            first += len(group["params"])
        current = self._state_dict()
        for p, entry in assigned:
            if id(p) not in where:
                shape = tuple(p.shape) if isinstance(p, torch.Tensor) else p
                raise ValueError(f"optimizer.state was assigned an entry for {shape!r}, which is not a parameter of "
                                 "this optimizer")
            key, index, i = where[id(p)]
            if not isinstance(entry, dict) or not isinstance(entry.get("step"), torch.Tensor):
                raise ValueError(f"optimizer.state[parameter {i} of group {index}] was assigned "
                                 f"{type(entry).__name__} {sorted(entry) if isinstance(entry, dict) else ''}; nibble "
                                 "loads one of its state_dict()'s per-parameter entries (with a tensor 'step')")
            expected = set(current["state"][key])
            if set(entry) != expected:
                raise ValueError(f"optimizer.state[parameter {i} of group {index}] was assigned the entries "
                                 f"{sorted(entry)}; this optimizer keeps {sorted(expected)}")
            current["state"][key] = entry
        for saved in current["param_groups"]:
            if "nibble" in saved:
                steps = [int(current["state"][key]["step"].item()) for key in saved["params"]]
                saved["nibble"] = dict(saved["nibble"], step=str(max([int(saved["nibble"]["step"]), *steps])))
        self._load_state_dict(current)
        self.state.clear()

    def load_state_dict(self, state_dict: dict) -> None:
        self._load_state_dict(state_dict)
        # The whole state is replaced: entries assigned to optimizer.state before are superseded.
        self.state.clear()

    def _load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups) if isinstance(groups, list) else 'no'} parameter groups, "
                             f"this optimizer has {len(self.param_groups)}")
        for index, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved.get("params", ())) != len(group["params"]):
                raise ValueError(f"parameter group {index} of the state_dict holds {len(saved.get('params', ()))} "
                                 f"parameters, this optimizer's holds {len(group['params'])}")
        if self._mesh is not None:
            self._load_sharded(state_dict, groups)
            return
        for index, saved in enumerate(groups):
            meta = saved.get("nibble")
            if isinstance(meta, dict) and meta.get("format") == _SHARDED_FORMAT:
                raise ValueError(f"parameter group {index}: the state_dict is the state of a sharded optimizer "
                                 "(DTensor parameters); load it into one over the same sharded parameters")
        files = []
        try:
            for index, (saved, group) in enumerate(zip(groups, self.param_groups)):
                if not group["params"]:
                    continue
                tensors: dict[str, torch.Tensor] = dict(saved.get("nibble_codebooks", {}))
                steps = []
                for i, key in enumerate(saved["params"]):
                    entry = state_dict["state"].get(key, {})
                    steps.append(int(entry["step"].item()) if "step" in entry else 0)
                    for name, t in entry.items():
                        if name != "step":
                            tensors[f"state.{i}.{name}"] = t
                tensors["steps"] = torch.tensor(steps, dtype=torch.int64)
                files.append((index, _write(tensors, saved.get("nibble", {}))))
            # Everything is written; now the groups take the saved hyperparameters and their state.
            for index, saved in enumerate(groups):
                for key, value in saved.items():
                    if key not in ("params", "nibble", "nibble_codebooks"):
                        self.param_groups[index][key] = value
                self._check_group(self.param_groups[index])
                self._groups.pop(index, None)
            for index, path in files:
                made = self._nibble(index)
                _lib.check(_lib.lib.nibble_load(made.handle, path.encode()))
        finally:
            for _, path in files:
                os.unlink(path)


_SHARDED_FORMAT = "nibble.sharded_state"


def _state_names(layout: dict) -> list[str]:
    """The state tensors of one parameter in a nibble state file's layout entry."""
    names = [slot["name"] for slot in layout["slots"]]
    if layout.get("master"):
        names.append("master")
    if layout.get("factored"):
        names += ["exp_avg_sq_row", "exp_avg_sq_col"]
    return names


def _count(meta: dict, key: str) -> int:
    value = meta.get(key)
    if not isinstance(value, str) or not value.isdigit():
        raise ValueError(f"the state_dict's {key} count is {value!r}, not a whole number")
    return int(value)


# -- the step as operators in PyTorch's registry: torch.ops.nibble.step (host scalars) and
# torch.ops.nibble.step_device (scalars in device tensors, for CUDA graphs and GradScaler). They
# declare the parameters they update; nibble's state is inside the library, reached by handle.

_LIVE = weakref.WeakValueDictionary()
_OPS = torch.library.Library("nibble", "DEF")
_OPS.define("step(int handle, Tensor(a!)[] params, float lr, float grad_scale, int found_inf) -> ()")
_OPS.define("step_device(int handle, Tensor(a!)[] params, Tensor lr, Tensor grad_scale, Tensor found_inf) -> ()")


def _current_stream(made: "_Group") -> Optional[ctypes.c_void_p]:
    """torch's current stream on a CUDA group's device (None on the CPU)."""
    if made.device.type != "cuda":
        return None
    return ctypes.c_void_p(torch.cuda.current_stream(made.device).cuda_stream)


def _step_host(handle: int, params: list[torch.Tensor], lr: float, grad_scale: float, found_inf: int) -> None:
    made = _LIVE[handle]
    _lib.check(_lib.lib.nibble_step(handle, grad_scale, lr, found_inf, _current_stream(made), None, None, None))


def _step_device(handle: int, params: list[torch.Tensor], lr: torch.Tensor, grad_scale: torch.Tensor,
                 found_inf: torch.Tensor) -> None:
    made = _LIVE[handle]
    views = made.scalars()
    views["lr_scale"].copy_(lr.reshape(1))
    views["grad_scale"].copy_(grad_scale.reshape(1))
    views["found_inf"].copy_(found_inf.reshape(1))
    _lib.check(_lib.lib.nibble_enqueue_step(handle, _current_stream(made)))


_OPS.impl("step", _step_host, "CPU")
_OPS.impl("step", _step_host, "CUDA")
_OPS.impl("step_device", _step_device, "CUDA")


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# -- safetensors, the format nibble's state files use --------------------------------------------

def _save(handle: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    fd, path = tempfile.mkstemp(suffix=".safetensors", prefix="nibble-state-")
    os.close(fd)
    try:
        _lib.check(_lib.lib.nibble_save(handle, path.encode()))
        with open(path, "rb") as f:
            raw = f.read()
    finally:
        os.unlink(path)
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    data = bytearray(raw[8 + size:])
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        flat = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=begin).clone() if end > begin \
            else torch.empty(0, dtype=torch.uint8)
        tensors[name] = flat.view(dtype).reshape(info["shape"])
    return tensors, metadata


def _write(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    header: dict[str, Any] = {}
    blobs = []
    offset = 0
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"state entry {name!r} is not a tensor")
        if t.dtype not in _ST_NAMES:
            raise ValueError(f"state entry {name!r} has dtype {t.dtype}, which nibble's state does not use")
        t = t.detach().to("cpu").contiguous()
        blob = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    fd, path = tempfile.mkstemp(suffix=".safetensors", prefix="nibble-state-")
    with os.fdopen(fd, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    return path


# -- the algorithms, with PyTorch's and the papers' argument names --------------------------------

_COMMON = ("precision", "block_size", "min_quant_size", "master_weights", "stochastic_rounding", "seed",
           "max_grad_norm")


def _settings(precision: Optional[str], block_size: int, min_quant_size: int, master_weights: bool,
              stochastic_rounding: bool, seed: int, max_grad_norm: float) -> dict:
    return {"precision": precision, "block_size": block_size, "min_quant_size": min_quant_size,
            "master_weights": master_weights, "stochastic_rounding": stochastic_rounding, "seed": seed,
            "max_grad_norm": max_grad_norm}


class SGD(NibbleOptimizer):
    """SGD with momentum, dampening and Nesterov, as torch.optim.SGD."""

    algorithm = "sgd"

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 precision: Optional[str] = None, block_size: int = 0, min_quant_size: int = 4096,
                 master_weights: bool = False, stochastic_rounding: bool = False, seed: int = 0, max_grad_norm: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize),
                         **_settings(precision, block_size, min_quant_size, master_weights, stochastic_rounding, seed, max_grad_norm))

    def _hyper(self, g: dict) -> dict:
        if g["nesterov"] and (g["momentum"] <= 0 or g["dampening"] != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0, got momentum "
                             f"{g['momentum']} and dampening {g['dampening']}")
        return {"momentum": _number("momentum", g["momentum"], 0.0, 1.0, True),
                "dampening": _number("dampening", g["dampening"], 0.0, 1.0),
                "weight_decay": _number("weight_decay", g["weight_decay"]),
                "nesterov": bool(g["nesterov"]), "maximize": bool(g["maximize"])}


class Adam(NibbleOptimizer):
    """Adam (weight decay added to the gradient), as torch.optim.Adam."""

    algorithm = "adam"
    default_weight_decay = 0.0

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: Optional[float] = None, amsgrad: bool = False, *,
                 maximize: bool = False, precision: Optional[str] = None, block_size: int = 0,
                 min_quant_size: int = 4096, master_weights: bool = False, stochastic_rounding: bool = False,
                 seed: int = 0, max_grad_norm: float = 0.0) -> None:
        wd = self.default_weight_decay if weight_decay is None else weight_decay
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=wd, amsgrad=amsgrad,
                                      maximize=maximize),
                         **_settings(precision, block_size, min_quant_size, master_weights, stochastic_rounding, seed, max_grad_norm))

    def _hyper(self, g: dict) -> dict:
        b1, b2 = _betas("betas", g["betas"])
        return {"beta1": b1, "beta2": b2, "eps": _number("eps", g["eps"]),
                "weight_decay": _number("weight_decay", g["weight_decay"]), "amsgrad": bool(g["amsgrad"]),
                "maximize": bool(g["maximize"])}


class AdamW(Adam):
    """AdamW (decoupled weight decay, default 1e-2), as torch.optim.AdamW."""

    algorithm = "adamw"
    default_weight_decay = 1e-2


class Lion(NibbleOptimizer):
    """Lion (Chen et al. 2023): the sign of an interpolated momentum, decoupled weight decay."""

    algorithm = "lion"

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, precision: Optional[str] = None,
                 block_size: int = 0, min_quant_size: int = 4096, master_weights: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0, max_grad_norm: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize),
                         **_settings(precision, block_size, min_quant_size, master_weights, stochastic_rounding, seed, max_grad_norm))

    def _hyper(self, g: dict) -> dict:
        b1, b2 = _betas("betas", g["betas"])
        return {"beta1": b1, "beta2": b2, "weight_decay": _number("weight_decay", g["weight_decay"]),
                "maximize": bool(g["maximize"])}


class Adafactor(NibbleOptimizer):
    """Adafactor (Shazeer & Stern 2018) with the arguments of the common PyTorch port: factored
    second moments for matrices, relative step (lr=None), update clipping; beta1 adds a first
    moment."""

    algorithm = "adafactor"

    def __init__(self, params: Iterable, lr: Optional[float] = None, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: Optional[float] = None,
                 weight_decay: float = 0.0, scale_parameter: bool = True, relative_step: bool = True,
                 warmup_init: bool = False, *, maximize: bool = False, precision: Optional[str] = None,
                 block_size: int = 0, min_quant_size: int = 4096, master_weights: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0, max_grad_norm: float = 0.0) -> None:
        if lr is not None and relative_step:
            raise ValueError("lr cannot be set together with relative_step=True (pass relative_step=False)")
        if lr is None and not relative_step:
            raise ValueError("lr must be given when relative_step=False")
        if warmup_init and not relative_step:
            raise ValueError("warmup_init needs relative_step=True")
        super().__init__(params, dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                                      beta1=beta1, weight_decay=weight_decay, scale_parameter=scale_parameter,
                                      relative_step=relative_step, warmup_init=warmup_init, maximize=maximize),
                         **_settings(precision, block_size, min_quant_size, master_weights, stochastic_rounding, seed, max_grad_norm))

    def _lr(self, group: dict) -> Any:
        return 1.0 if group["lr"] is None else group["lr"]

    def _hyper(self, g: dict) -> dict:
        eps = g["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"eps must be a pair (eps1, eps2), got {eps!r}")
        hyper = {"eps": _number("eps[0]", eps[0]), "eps2": _number("eps[1]", eps[1]),
                 "clip_threshold": _number("clip_threshold", g["clip_threshold"]),
                 "decay_rate": _number("decay_rate", g["decay_rate"], -1.0, 0.0),
                 "weight_decay": _number("weight_decay", g["weight_decay"]),
                 "scale_parameter": bool(g["scale_parameter"]), "relative_step": bool(g["relative_step"]),
                 "warmup_init": bool(g["warmup_init"]), "maximize": bool(g["maximize"]),
                 "first_moment": g["beta1"] is not None}
        if g["beta1"] is not None:
            hyper["beta1"] = _number("beta1", g["beta1"], 0.0, 1.0, True)
        return hyper


class AdamP(NibbleOptimizer):
    """AdamP (Heo et al. 2021): Adam without the radial part of the update for scale-invariant
    weights."""

    algorithm = "adamp"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, delta: float = 0.1, wd_ratio: float = 0.1,
                 nesterov: bool = False, *, maximize: bool = False, precision: Optional[str] = None,
                 block_size: int = 0, min_quant_size: int = 4096, master_weights: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0, max_grad_norm: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta,
                                      wd_ratio=wd_ratio, nesterov=nesterov, maximize=maximize),
                         **_settings(precision, block_size, min_quant_size, master_weights, stochastic_rounding, seed, max_grad_norm))

    def _hyper(self, g: dict) -> dict:
        b1, b2 = _betas("betas", g["betas"])
        return {"beta1": b1, "beta2": b2, "eps": _number("eps", g["eps"]),
                "weight_decay": _number("weight_decay", g["weight_decay"]), "delta": _number("delta", g["delta"]),
                "wd_ratio": _number("wd_ratio", g["wd_ratio"], 0.0, 1.0), "nesterov": bool(g["nesterov"]),
                "maximize": bool(g["maximize"])}


class QHM(NibbleOptimizer):
    """Quasi-hyperbolic momentum (Ma & Yarats 2019): nu-weighted mix of the gradient and momentum."""

    algorithm = "qhm"

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.999, nu: float = 0.7,
                 weight_decay: float = 0.0, *, maximize: bool = False, precision: Optional[str] = None,
                 block_size: int = 0, min_quant_size: int = 4096, master_weights: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0, max_grad_norm: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, nu=nu, weight_decay=weight_decay, maximize=maximize),
                         **_settings(precision, block_size, min_quant_size, master_weights, stochastic_rounding, seed, max_grad_norm))

    def _hyper(self, g: dict) -> dict:
        return {"momentum": _number("momentum", g["momentum"], 0.0, 1.0, True), "nu": _number("nu", g["nu"], 0.0, 1.0),
                "weight_decay": _number("weight_decay", g["weight_decay"]), "maximize": bool(g["maximize"])}


class SophiaG(NibbleOptimizer):
    """SophiaG (Liu et al. 2023): momentum preconditioned by an EMA of Hessian-diagonal estimates,
    given with update_hessian(); bs is the tokens per batch that scales rho."""

    algorithm = "sophiag"

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 1e-1, bs: int = 5120, *, maximize: bool = False,
                 precision: Optional[str] = None, block_size: int = 0, min_quant_size: int = 4096,
                 master_weights: bool = False, stochastic_rounding: bool = False, seed: int = 0, max_grad_norm: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, bs=bs, maximize=maximize),
                         **_settings(precision, block_size, min_quant_size, master_weights, stochastic_rounding, seed, max_grad_norm))

    def _hyper(self, g: dict) -> dict:
        b1, b2 = _betas("betas", g["betas"])
        return {"beta1": b1, "beta2": b2, "rho": _number("rho", g["rho"]),
                "weight_decay": _number("weight_decay", g["weight_decay"]),
                "batch_tokens": _number("bs", g["bs"], 1.0), "maximize": bool(g["maximize"])}

    @torch.no_grad()
    def update_hessian(self, estimates: Optional[list[list[Optional[torch.Tensor]]]] = None) -> None:
        """Folds one Hessian-diagonal estimate per parameter into the Hessian EMA: `estimates` has a
        list per parameter group (None for a parameter skips it); by default each parameter's
        gradient squared (the Gauss-Newton-Bartlett estimate when the gradient came from labels
        sampled from the model)."""
        if len(self.state):
            self._load_assigned()
        for index, group in enumerate(self.param_groups):
            if not group["params"]:
                continue
            made = self._nibble(index)
            given = estimates[index] if estimates is not None else [
                None if p.grad is None else p.grad.float() * p.grad.float() for p in group["params"]]
            if len(given) != len(group["params"]):
                raise ValueError(f"estimates of group {index}: {len(given)} given for {len(group['params'])} parameters")
            keep = []
            for p, e in zip(group["params"], given):
                if e is not None:
                    e, p = _local(e), _local(p)
                    if e.shape != p.shape:
                        raise ValueError(f"a Hessian estimate has shape {tuple(e.shape)}, its parameter {tuple(p.shape)}")
                    e = e.to(device=p.device, dtype=torch.float32).contiguous()
                keep.append(e)
            array = (ctypes.c_void_p * max(len(keep), 1))(*[None if e is None else e.data_ptr() for e in keep])
            _lib.check(_lib.lib.nibble_update_hessian(made.handle, array, len(keep)))


def _with_precision(base: type, precision: str, name: str) -> type:
    """An alias class whose precision defaults to `precision` (AdamW8bit, ...)."""
    return type(name, (base,), {"default_precision": precision, "__doc__": f"{base.__name__} with {precision} state."})


Adam8bit = _with_precision(Adam, "8bit", "Adam8bit")
Adam4bit = _with_precision(Adam, "4bit", "Adam4bit")
AdamW8bit = _with_precision(AdamW, "8bit", "AdamW8bit")
AdamW4bit = _with_precision(AdamW, "4bit", "AdamW4bit")
Lion8bit = _with_precision(Lion, "8bit", "Lion8bit")
