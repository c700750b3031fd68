"""nibble's optimizers as torch.optim.Optimizer subclasses: SGD, Adam, AdamW, Lion, Adafactor,
AdamP, QHM and SophiaG with state at fp32, bf16, 8-bit or 4-bit, stepped by nibble's C++/CUDA
library in one call per parameter group (no per-parameter Python loop, no synchronisation)."""
from __future__ import annotations

import collections
import os
from typing import Any, Callable, Iterable, Optional

import torch

from . import _dtensor, _handle, _lib, _safetensors, _state
from . import _ops  # noqa: F401  (registers torch.ops.nibble.step and step_device)

# The public classes, exported by the package as they are listed here.
__all__ = ["SGD", "Adam", "AdamW", "RAdam", "Lion", "Adafactor", "AdamP", "QHM", "SophiaG", "ADOPT", "AdEMAMix",
           "Adam8bit", "Adam4bit", "AdamW8bit", "AdamW4bit", "Lion8bit", "AdEMAMix8bit", "NibbleOptimizer",
           "AdamFp8", "AdamWFp8", "LionFp8", "AdEMAMixFp8", "AdamWScheduleFree", "AdamWScheduleFree8bit", "Muon",
           "Muon8bit"]

# The state precisions by their names in nibble, from the library's table (it also takes aliases
# such as "int8").
PRECISIONS = tuple(_lib.tables()["precisions"])


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


# NOTE: ranges and rules of hyperparameters and settings are the library's (nibble_create refuses a
# bad one with a message naming it, checked at once by _check_group). Python checks only what the
# library cannot see: the types of the values it turns into JSON, which cannot carry NaN or inf.

def _number(name: str, value: Any) -> float:
    """`value` (a number or a one-element tensor) as a finite float for nibble's JSON options."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not value == value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _pair(name: str, value: Any) -> tuple[float, float]:
    """A torch-style pair argument (betas, Adafactor's eps) as two numbers."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair of numbers, got {value!r}")
    return _number(f"{name}[0]", value[0]), _number(f"{name}[1]", value[1])


def _integer(name: str, value: Any) -> int:
    """An integer setting (JSON would read a float or a bool as one)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


_EMPTY_GRADS: dict[torch.device, torch.Tensor] = {}  # per device, the address passed for an empty gradient


def _on_device(x: Any, default: float, device: torch.device) -> torch.Tensor:
    """A step scalar (lr, grad_scale, found_inf) as a float32 0-d tensor on `device`: a tensor as
    it is, a number or None (`default`) copied there."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.full((), default if x is None else float(x), dtype=torch.float32, device=device)


def _empty_grad(device: torch.device) -> int:
    """A valid address on `device` for a gradient with no elements (see _set_grads)."""
    if device not in _EMPTY_GRADS:
        _EMPTY_GRADS[device] = torch.zeros(1, device=device)
    return _EMPTY_GRADS[device].data_ptr()


class NibbleOptimizer(torch.optim.Optimizer):
    """Base of nibble's optimizers. Subclasses name the algorithm and map a parameter group's
    hyperparameters (PyTorch's names) to nibble's."""

    algorithm = ""
    default_precision = "fp32"
    # nibble's hyperparameters that the subclass takes under another torch argument name, for the
    # library's error messages: {"beta1": "betas[0]", ...}.
    _torch_names: dict[str, str] = {}
    # torch.amp.GradScaler hands over grad_scale and found_inf instead of unscaling the gradients.
    _step_supports_amp_scaling = True
    # A group's entries that may change after its first step without a new nibble optimizer.
    _runtime_keys: tuple[str, ...] = ("params", "lr")

    def __init__(self, params: Iterable, defaults: dict, *, precision: Optional[str], block_size: int,
                 min_quant_size: int, master_weights: bool, stochastic_rounding: bool, seed: int,
                 max_grad_norm: float = 0.0, check_finite: bool = True) -> None:
        precision = self.default_precision if precision is None else precision
        max_grad_norm = _number("max_grad_norm", max_grad_norm)
        if not isinstance(check_finite, bool):
            raise ValueError(f"check_finite must be True or False, got {check_finite!r}")
        defaults = dict(defaults, precision=precision)
        self._settings = {"block_size": _integer("block_size", block_size),
                          "min_quant_size": _integer("min_quant_size", min_quant_size),
                          "master_weights": master_weights, "stochastic_rounding": stochastic_rounding,
                          "seed": int(seed)}
        if max_grad_norm != 0:
            self._settings["max_grad_norm"] = max_grad_norm
        if not check_finite:
            self._settings["check_finite"] = False
        self._groups: dict[int, _handle.GroupHandle] = {}
        self._mesh: Any = None  # the device mesh of DTensor parameters: set, the optimizer is sharded
        # Per group (by the group's id), the parameter objects _check_layout last saw: a group's
        # "params" may be edited, and groups removed from param_groups.
        self._layout_ids: dict[int, tuple[int, ...]] = {}
        self._constructed = False
        self.last_grad_norm = float("nan")
        super().__init__(params, defaults)  # validates every group in add_param_group
        self._constructed = True
        self._check_devices()
        self._create_sharded()

    @property
    def state(self) -> _StateView:
        """torch's `optimizer.state`: see _StateView."""
        return self._state_view

    @state.setter
    def state(self, value: Any) -> None:
        """torch.optim.Optimizer.__init__ sets it (an empty view). A script that assigns a new
        mapping afterwards (`optimizer.state = defaultdict(dict)`) resets the state, as it does with
        torch.optim: every group starts afresh (zero state, step 0) at its next step, and entries the
        mapping holds are loaded as entries assigned to `state[param]` are."""
        view = _StateView(dict)
        view.update(value)
        if getattr(self, "_constructed", False):
            self._groups.clear()
        self._state_view = view

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
        self._layout_ids[id(group)] = tuple(map(id, params))
        sharded = [i for i, p in enumerate(params) if _dtensor.is_dtensor(p)]
        if not sharded:
            return
        if len(sharded) != len(params):
            plain = next(i for i, p in enumerate(params) if not _dtensor.is_dtensor(p))
            raise ValueError(f"parameter group {index} mixes DTensor parameters (parameter {sharded[0]}) with plain "
                             f"tensors (parameter {plain}); nibble steps a group as one sharded layout, so give the "
                             "plain tensors a group of their own")
        mesh = params[sharded[0]].device_mesh
        for i in sharded:
            if params[i].device_mesh != mesh:
                raise ValueError(f"parameter group {index}: parameter {i} is on device mesh {params[i].device_mesh}, "
                                 f"parameter {sharded[0]} on {mesh}; a group's DTensors must share one mesh")
            _dtensor.layout(params[i])
        if self._mesh is not None and self._mesh != mesh:
            raise ValueError(f"parameter group {index} is on device mesh {mesh}, an earlier group on {self._mesh}; "
                             "one nibble optimizer steps the parameters of one mesh")
        if mesh.ndim != 1 and mesh.size() != torch.distributed.get_world_size():
            raise ValueError(f"parameter group {index} is on device mesh {mesh}: nibble reduces the gradient norm "
                             "over a one-dimensional mesh or one that spans every rank")
        self._mesh = mesh

    def _check_devices(self) -> None:
        devices = {p.device for group in self.param_groups for p in group["params"]}
        if self._global_norm() and len(devices) > 1:
            why = "a sharded optimizer" if self._mesh is not None else "max_grad_norm over several parameter groups"
            raise ValueError(f"{why} reduces one gradient norm over all parameters, which are on "
                             f"{sorted(map(str, devices))}; put them on one device")

    def _global_norm(self) -> bool:
        """Whether a step reduces one gradient norm over the groups (and ranks) before any group
        steps: sharded, or clipping on the CPU or over several CUDA groups. A single CUDA group that
        clips computes its norm inside its own step."""
        if self._mesh is not None:
            return True
        if not self._settings.get("max_grad_norm"):
            return False
        return self._on_cpu() or sum(1 for group in self.param_groups if group["params"]) > 1

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
        """nibble's hyperparameters of a group (everything but lr), from the torch class's."""
        raise NotImplementedError

    def _lr(self, group: dict) -> Any:
        return group["lr"]

    def _check_group(self, group: dict) -> None:
        """Validates a group's settings and parameters; raises ValueError naming the bad one."""
        options = self._options(group, torch.device("cpu"))
        if group.get("lr") is not None:
            options["hyper"]["lr"] = _number("lr", self._lr(group))
        _handle.check_options(options, self._torch_names)
        for i, p in enumerate(group["params"]):
            if p.dtype not in _handle.DTYPES:
                raise ValueError(f"parameter {i}: parameters must be float32, bfloat16 or float16, got {p.dtype}")
            if not p.is_contiguous():
                raise ValueError(f"parameter {i}: parameters must be contiguous; got one of shape {tuple(p.shape)} "
                                 f"with strides {p.stride()} (channels_last? .contiguous() the module's weights)")
            if p.device.type not in ("cpu", "cuda"):
                raise ValueError(f"parameter {i}: parameters must be on cpu or cuda, got {p.device}")
            if p.device.type == "cpu" and p.dtype != torch.float32:
                raise ValueError(f"parameter {i}: the CPU backend steps float32 parameters, got {p.dtype} "
                                 "(bfloat16 and float16 parameters are stepped on CUDA)")

    # -- the nibble optimizer of a group --------------------------------------------------------

    def _options(self, group: dict, device: torch.device) -> dict:
        hyper = self._hyper(group)
        hyper["lr"] = 1.0  # the group's lr arrives every step as lr_scale, so schedulers cost nothing
        return {"algorithm": self.algorithm, "precision": group["precision"], "device": device.type,
                "hyper": hyper, **self._settings}

    def _fixed_key(self, group: dict) -> tuple:
        """The group's settings that must not change after its first step (everything but lr),
        hashable, so that a step compares them without rebuilding nibble's options."""
        freeze = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
        return tuple((k, freeze(v)) for k, v in group.items() if k not in self._runtime_keys)

    def _identity(self, params: list) -> tuple:
        """What a group's nibble optimizer holds of its parameters: their objects and the addresses
        of their (local) data, which the library writes."""
        if self._mesh is not None:
            return tuple(map(id, params)), tuple(_dtensor.local(p).data_ptr() for p in params)
        return tuple(map(id, params)), tuple(map(torch.Tensor.data_ptr, params))

    def _nibble(self, index: int) -> _handle.GroupHandle:
        group = self.param_groups[index]
        existing = self._groups.get(index)
        key = self._fixed_key(group)
        identity = self._identity(group["params"])
        if existing is not None and existing.key == key and existing.identity == identity:
            return existing
        if existing is not None and (existing.ahead or existing.counters() == (0, 0)):
            existing = None  # nothing learned yet: made anew from the group as it is now
        if existing is None:
            made = self._create(index, group)
            self._register(index, made)
            return made
        options = self._options(group, existing.device)
        if existing.options != options:
            self._change_hyper(index, existing, options)
        if existing.identity[0] != identity[0]:
            held, now = existing.identity[0], identity[0]
            what = (f"it held {len(held)} parameters and holds {len(now)}" if len(held) != len(now) else
                    f"parameter {next(i for i, (a, b) in enumerate(zip(held, now)) if a != b)} is another tensor")
            raise ValueError(f"parameter group {index}: its parameters changed after its first step ({what}); nibble "
                             "keeps a group's state by position, where torch.optim would start a new parameter "
                             "afresh: give new parameters a group of their own (add_param_group) or a new optimizer, "
                             "or change a parameter's data in place (p.data = ...), which keeps its state")
        if existing.identity != identity:
            return self._move(index, existing, group)
        existing.key = key
        return existing

    def _change_hyper(self, index: int, existing: _handle.GroupHandle, options: dict) -> None:
        """A group whose settings changed after its first step (a scheduler cycling betas or
        momentum, a weight-decay schedule): its hyperparameters change in the library, its state
        stays. Settings that decide which state is kept (precision, amsgrad, ...) are refused, and
        then nothing changes."""
        fixed = [k for k in options if k != "hyper" and existing.options.get(k) != options.get(k)]
        if fixed:
            names = ", ".join(fixed)
            raise ValueError(f"parameter group {index}: {names} changed after its first step; it decides the state "
                             "nibble keeps and is fixed once the group has stepped (hyperparameters such as lr, "
                             "betas, momentum and weight_decay may change): make a new optimizer to change it")
        changed = {k: v for k, v in options["hyper"].items() if existing.options["hyper"].get(k) != v}
        try:
            existing.set_hyper(changed)
        except ValueError as e:
            raise ValueError(f"parameter group {index}: {e}") from None
        existing.options = options

    def _move(self, index: int, existing: _handle.GroupHandle, group: dict) -> _handle.GroupHandle:
        """A group whose parameters' data moved after its first step (p.data = ..., model.to(),
        load_state_dict(assign=True)): a nibble optimizer over the data as it is now, with the
        state of the old one (the library refuses it, naming why, if it no longer fits them: a new
        shape, say). Until it is in place the old one stays, so a refusal changes nothing."""
        tensors, metadata = existing.save()
        made = self._create(index, group)
        path = _safetensors.write_temporary(tensors, metadata)
        try:
            made.load(path)
        except ValueError as e:
            raise ValueError(f"parameter group {index}: its parameters' data changed after its first step, and its "
                             f"state does not fit them: {str(e).replace(path, 'the state')}") from None
        finally:
            os.unlink(path)
        self._register(index, made)
        return made

    def _register(self, index: int, made: _handle.GroupHandle) -> None:
        made.register()
        made.group_id = id(self.param_groups[index])
        self._groups[index] = made
        self.state.holds_state = True

    def _create(self, index: int, group: dict) -> _handle.GroupHandle:
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
        global_shapes, splits, counted = [], [], []
        for p in params:
            if _dtensor.is_dtensor(p):
                split, count = _dtensor.layout(p)
                global_shapes.append(p.shape)
            else:
                # A plain tensor beside sharded ones is taken as replicated over the mesh.
                coordinate = self._mesh.get_coordinate() if self._mesh is not None else None
                split, count = False, coordinate is None or all(c == 0 for c in coordinate)
                global_shapes.append(None)
            splits.append(split)
            counted.append(int(count))
        made = _handle.GroupHandle(options, [_dtensor.local(p) for p in params], device, grad_dtypes,
                                   global_shapes=global_shapes, splits=splits,
                                   counted=counted if self._mesh is not None else None,
                                   torch_names=self._torch_names)
        made.key = key
        made.identity = self._identity(params)
        return made

    def _set_grads(self, index: int, made: _handle.GroupHandle) -> None:
        grads = []
        # Only a sharded optimizer's parameters (and so gradients) are DTensors; the test per
        # gradient was half this loop's time on 148 small tensors.
        sharded = self._mesh is not None
        for i, p in enumerate(self.param_groups[index]["params"]):
            g = p.grad
            if g is None:
                grads.append(None)
                continue
            if sharded:
                g = _dtensor.local(g)
            if g.is_sparse:
                raise ValueError("nibble optimizers do not take sparse gradients")
            if g.dtype != made.grad_dtypes[i]:
                raise ValueError(f"parameter {i} of group {index}: gradient dtype {g.dtype} differs from "
                                 f"{made.grad_dtypes[i]}, the one its first step saw")
            if not g.is_contiguous():
                raise ValueError(f"parameter {i} of group {index}: the gradient is not contiguous")
            # An empty gradient (this rank's shard of a sharded parameter can be empty) has no
            # address; any valid one tells the library that the parameter has a gradient this step,
            # so its step count and running sums advance on every rank alike. Nothing is read.
            grads.append(g.data_ptr() if g.numel() > 0 else _empty_grad(g.device))
        made.set_grads(grads)

    # -- torch.optim.Optimizer ------------------------------------------------------------------

    # NOTE: under torch.compile the step runs eagerly (one graph break, no tracing of its Python):
    # it is one call into the library per group through ctypes, which Dynamo cannot trace.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if len(self.state):
            self._load_assigned()
        self._refresh_layout()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if self._global_norm():
            if self._on_cpu():
                self._step_with_norm(grad_scale, found_inf)
            else:
                self._step_with_device_norm(grad_scale, found_inf)
            return loss
        # Every group is checked (settings, parameters, gradients) before any steps, so a refused
        # step changes nothing.
        stepping = []
        for index, group in enumerate(self.param_groups):
            if group["params"]:
                made = self._nibble(index)
                self._set_grads(index, made)
                stepping.append((made, group))
        for made, group in stepping:
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
            torch.ops.nibble.step_device(made.handle, group["params"], _on_device(lr, 0.0, made.device),
                                         _on_device(grad_scale, 1.0, made.device),
                                         _on_device(found_inf, 0.0, made.device))
        if self._settings.get("max_grad_norm") and stepping and stepping[0][0].device.type == "cuda":
            # One CUDA group that clips computed its norm in its own step: a copy of it, on the
            # device (reading it waits for the step), as the multi-group path gives.
            self.last_grad_norm = stepping[0][0].scalars()["grad_norm"].reshape(()).clone()
        return loss

    def _refresh_layout(self) -> None:
        """Follows edits of param_groups since the last call: each nibble optimizer stays with its
        group (by the group's identity: a group removed from the list takes its state with it),
        and the groups whose "params" lists hold other objects than before (e.g. swapped for
        FSDP2's DTensors after the optimizer was made) have their layout (plain or DTensor, one
        mesh) checked again."""
        by_group = {made.group_id: made for made in self._groups.values()}
        self._groups = {index: by_group[id(group)] for index, group in enumerate(self.param_groups)
                        if id(group) in by_group}
        live = {id(group) for group in self.param_groups}
        for key in [key for key in self._layout_ids if key not in live]:
            del self._layout_ids[key]
        for index, group in enumerate(self.param_groups):
            if self._layout_ids.get(id(group)) != tuple(map(id, group["params"])):
                self._check_group(group)
                self._check_layout(index, group)
                self._check_devices()

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
            total += made.grad_square_sum()
            stepping.append((made, group))
        if found_inf is not None and float(found_inf) != 0.0:
            total = float("inf")
        if self._mesh is not None:
            mesh = self._mesh
            reduced = torch.tensor([total], dtype=torch.float64, device="cpu")
            torch.distributed.all_reduce(reduced, group=mesh.get_group() if mesh.ndim == 1 else None)
            total = reduced.item()
        scale = 1.0 if grad_scale is None else float(grad_scale)
        norm = float("nan")
        for made, group in stepping:
            norm = made.step_with_square_sum(scale, float(self._lr(group)), total)
            made.ahead = False
        self.last_grad_norm = norm

    def _step_with_device_norm(self, grad_scale: Any, found_inf: Any) -> None:
        """The CUDA step of a sharded optimizer, or one that clips over several groups, queued
        without a host round trip: every group's square sum into one device tensor, their total
        (inf when a GradScaler found inf on this rank) all-reduced over the ranks (NCCL) when
        sharded, and every group's step reading it. last_grad_norm is then a 0-d tensor on the
        device (reading it waits for the step)."""
        stepping = []
        for index, group in enumerate(self.param_groups):
            if group["params"]:
                made = self._nibble(index)
                self._set_grads(index, made)
                stepping.append((made, group))
        device = stepping[0][0].device
        sums = torch.zeros(len(stepping), dtype=torch.float64, device=device)
        for k, (made, _) in enumerate(stepping):
            made.enqueue_grad_square_sum(sums[k])
        total = sums.sum()
        if found_inf is not None:
            found = (_on_device(found_inf, 0.0, device) != 0).reshape(())
            total = torch.where(found, torch.full_like(total, float("inf")), total)
        if self._mesh is not None:
            mesh = self._mesh
            torch.distributed.all_reduce(total, group=mesh.get_group() if mesh.ndim == 1 else None)
        scale = _on_device(grad_scale, 1.0, device)
        for made, group in stepping:
            # The local pieces: the operator declares what it updates, and a DTensor would send it
            # through DTensor's sharding rules, which know nothing of it.
            params = [_dtensor.local(p) for p in group["params"]]
            torch.ops.nibble.step_device_sum(made.handle, params, _on_device(self._lr(group), 0.0, device), scale,
                                             total)
            made.ahead = False
        self.last_grad_norm = total.sqrt() / scale.reshape(()).to(torch.float64)

    def counters(self) -> list[tuple[int, int]]:
        """(steps taken, steps skipped) per parameter group that has stepped."""
        if len(self.state):
            self._load_assigned()
        return [self._groups[index].counters() for index in sorted(self._groups)]

    def state_bytes(self) -> int:
        """Bytes of optimizer state nibble holds (codes, scales and full-precision state)."""
        if len(self.state):
            self._load_assigned()
        return sum(self._nibble(index).state_bytes() for index in range(len(self.param_groups))
                   if self.param_groups[index]["params"])

    def state_dict(self) -> dict:
        """PyTorch's layout: {"state": {param index: {"step", "exp_avg", ...}}, "param_groups": [...]}.
        Quantized state appears as uint8 "<name>.codes" plus float32 "<name>.absmax" (or
        "row_max"/"col_max"); every tensor is on the CPU, so the dict loads on any device.
        A sharded optimizer's state is DTensors shaped like the parameters (see _state._sharded_group).
        Hooks registered with register_state_dict_pre_hook / _post_hook run as torch.optim's do."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        if len(self.state):
            self._load_assigned()
        self._refresh_layout()
        result = self._state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            hooked = post_hook(self, result)
            if hooked is not None:
                result = hooked
        return result

    def _state_dict(self) -> dict:
        return _state.state_dict(self)

    def _load_assigned(self) -> None:
        _state.load_assigned(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """Replaces every group's settings and state with the state_dict's, after checking all of it
        (a refused one leaves the optimizer as it was). Hooks registered with
        register_load_state_dict_pre_hook / _post_hook run as torch.optim's do."""
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hooked = pre_hook(self, state_dict)
            if hooked is not None:
                state_dict = hooked
        self._refresh_layout()
        _state.load_state_dict(self, state_dict)
        # The whole state is replaced: entries assigned to optimizer.state before are superseded.
        self.state.clear()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict:
        """For copy.deepcopy and pickle: torch's fields and the settings, with nibble's state as a
        state_dict (the library's optimizers themselves are not copied; __setstate__ makes new ones)."""
        return {"defaults": self.defaults, "param_groups": self.param_groups, "_settings": self._settings,
                "_nibble_state": self.state_dict() if self._groups else None}

    def __setstate__(self, saved: dict) -> None:
        nibble_state = saved.pop("_nibble_state", None)
        super().__setstate__({"defaults": saved["defaults"], "param_groups": saved["param_groups"]})
        self._state_view = _StateView(dict)
        self._settings = saved["_settings"]
        self._groups, self._mesh, self._layout_ids = {}, None, {}
        self._constructed = True
        self.last_grad_norm = float("nan")
        for index, group in enumerate(self.param_groups):
            self._check_layout(index, group)
        if nibble_state is not None:
            self.load_state_dict(nibble_state)


# -- the algorithms, with PyTorch's and the papers' argument names --------------------------------
#
# Everything Python knows of each algorithm is in this section (but the names of Adafactor's factored
# state, in _state.py): its class (nibble's algorithm name, torch's argument names and defaults), how
# a parameter group's arguments become nibble's hyperparameters (_hyper), the names torch gives
# nibble's (_torch_names), and the aliases with another default precision at the end.

def _settings(precision: Optional[str], block_size: int, min_quant_size: int, master_weights: bool,
              stochastic_rounding: bool, seed: int, max_grad_norm: float, check_finite: bool) -> dict:
    return {"precision": precision, "block_size": block_size, "min_quant_size": min_quant_size,
            "master_weights": master_weights, "stochastic_rounding": stochastic_rounding, "seed": seed,
            "max_grad_norm": max_grad_norm, "check_finite": check_finite}


_BETAS = {"beta1": "betas[0]", "beta2": "betas[1]"}


def _implementation(foreach: Optional[bool], fused: Optional[bool], capturable: bool, differentiable: bool,
                    **more: Any) -> dict:
    """torch.optim's choices of implementation, taken so that a script written for torch's class
    runs unchanged, and kept in the groups as torch keeps them. nibble has one implementation: a
    fused multi-tensor step that is capturable in CUDA graphs (with lr as a CUDA tensor), so foreach,
    fused and capturable change nothing; differentiable=True (autograd through the step) is refused."""
    if foreach and fused:
        raise ValueError("foreach and fused cannot both be True (as in torch.optim); nibble's step is always fused")
    if differentiable:
        raise ValueError("differentiable=True is not supported: nibble's step runs outside autograd "
                         "(the library updates the parameters and the state in place)")
    return dict(foreach=foreach, fused=fused, capturable=bool(capturable), differentiable=False, **more)


class SGD(NibbleOptimizer):
    """SGD with momentum, dampening and Nesterov, as torch.optim.SGD."""

    algorithm = "sgd"

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False, fused: Optional[bool] = None,
                 precision: Optional[str] = None, block_size: int = 0, min_quant_size: int = 4096,
                 master_weights: bool = False, stochastic_rounding: bool = False, seed: int = 0, max_grad_norm: float = 0.0, check_finite: bool = True) -> None:
        implementation = _implementation(foreach, fused, False, differentiable)
        del implementation["capturable"]  # torch.optim.SGD has none
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize, **implementation),
                         **_settings(precision, block_size, min_quant_size, master_weights, stochastic_rounding, seed, max_grad_norm, check_finite))

    def _hyper(self, g: dict) -> dict:
        return {"momentum": _number("momentum", g["momentum"]), "dampening": _number("dampening", g["dampening"]),
                "weight_decay": _number("weight_decay", g["weight_decay"]),
                "nesterov": bool(g["nesterov"]), "maximize": bool(g["maximize"])}


class Adam(NibbleOptimizer):
    """Adam (weight decay added to the gradient), as torch.optim.Adam."""

    algorithm = "adam"
    _torch_names = _BETAS
    default_weight_decay = 0.0

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: Optional[float] = None, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None, decoupled_weight_decay: Optional[bool] = None,
                 precision: Optional[str] = None, block_size: int = 0,
                 min_quant_size: int = 4096, master_weights: bool = False, stochastic_rounding: bool = False,
                 seed: int = 0, max_grad_norm: float = 0.0, check_finite: bool = True) -> None:
        wd = self.default_weight_decay if weight_decay is None else weight_decay
        # torch.optim.Adam(decoupled_weight_decay=True) is AdamW; AdamW always decouples.
        decoupled = self.algorithm == "adamw" if decoupled_weight_decay is None else bool(decoupled_weight_decay)
        if self.algorithm == "adamw" and not decoupled:
            raise ValueError("AdamW always decouples weight decay; decoupled_weight_decay=False is nibble.Adam")
        more = {"decoupled_weight_decay": decoupled}
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=wd, amsgrad=amsgrad,
                                      maximize=maximize,
                                      **_implementation(foreach, fused, capturable, differentiable, **more)),
                         **_settings(precision, block_size, min_quant_size, master_weights, stochastic_rounding, seed, max_grad_norm, check_finite))

    def _hyper(self, g: dict) -> dict:
        b1, b2 = _pair("betas", g["betas"])
        hyper = {"beta1": b1, "beta2": b2, "eps": _number("eps", g["eps"]),
                 "weight_decay": _number("weight_decay", g["weight_decay"]), "amsgrad": bool(g["amsgrad"]),
                 "maximize": bool(g["maximize"])}
        if self.algorithm == "adam":
            hyper["decoupled_weight_decay"] = bool(g.get("decoupled_weight_decay", False))
        return hyper


class AdamW(Adam):
    """AdamW (decoupled weight decay, default 1e-2), as torch.optim.AdamW."""

    algorithm = "adamw"
    default_weight_decay = 1e-2


class RAdam(NibbleOptimizer):
    """RAdam (Liu et al. 2020): Adam with its adaptive rate rectified, and plain momentum steps
    while the rate's variance is intractable, as torch.optim.RAdam."""

    algorithm = "radam"
    _torch_names = _BETAS

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled_weight_decay: bool = False, *,
                 foreach: Optional[bool] = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, precision: Optional[str] = None, block_size: int = 0,
                 min_quant_size: int = 4096, master_weights: bool = False, stochastic_rounding: bool = False,
                 seed: int = 0, max_grad_norm: float = 0.0, check_finite: bool = True) -> None:
        implementation = _implementation(foreach, None, capturable, differentiable)
        del implementation["fused"]  # torch.optim.RAdam has none
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=bool(decoupled_weight_decay), maximize=maximize,
                                      **implementation),
                         **_settings(precision, block_size, min_quant_size, master_weights, stochastic_rounding, seed, max_grad_norm, check_finite))

    def _hyper(self, g: dict) -> dict:
        b1, b2 = _pair("betas", g["betas"])
        return {"beta1": b1, "beta2": b2, "eps": _number("eps", g["eps"]),
                "weight_decay": _number("weight_decay", g["weight_decay"]),
                "decoupled_weight_decay": bool(g["decoupled_weight_decay"]), "maximize": bool(g["maximize"])}


class Lion(NibbleOptimizer):
    """Lion (Chen et al. 2023): the sign of an interpolated momentum, decoupled weight decay."""

    algorithm = "lion"
    _torch_names = _BETAS

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, precision: Optional[str] = None,
                 block_size: int = 0, min_quant_size: int = 4096, master_weights: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0, max_grad_norm: float = 0.0, check_finite: bool = True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize),
                         **_settings(precision, block_size, min_quant_size, master_weights, stochastic_rounding, seed, max_grad_norm, check_finite))

    def _hyper(self, g: dict) -> dict:
        b1, b2 = _pair("betas", g["betas"])
        return {"beta1": b1, "beta2": b2, "weight_decay": _number("weight_decay", g["weight_decay"]),
                "maximize": bool(g["maximize"])}


class Adafactor(NibbleOptimizer):
    """Adafactor (Shazeer & Stern 2018) with the arguments of the common PyTorch port: factored
    second moments for matrices, relative step (lr=None), update clipping; beta1 adds a first
    moment."""

    algorithm = "adafactor"
    _torch_names = {"eps": "eps[0]", "eps2": "eps[1]"}

    def __init__(self, params: Iterable, lr: Optional[float] = None, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: Optional[float] = None,
                 weight_decay: float = 0.0, scale_parameter: bool = True, relative_step: bool = True,
                 warmup_init: bool = False, *, maximize: bool = False, precision: Optional[str] = None,
                 block_size: int = 0, min_quant_size: int = 4096, master_weights: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0, max_grad_norm: float = 0.0, check_finite: bool = True) -> None:
        if lr is not None and relative_step:
            raise ValueError("lr cannot be set together with relative_step=True (pass relative_step=False)")
        if lr is None and not relative_step:
            raise ValueError("lr must be given when relative_step=False")
        super().__init__(params, dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                                      beta1=beta1, weight_decay=weight_decay, scale_parameter=scale_parameter,
                                      relative_step=relative_step, warmup_init=warmup_init, maximize=maximize),
                         **_settings(precision, block_size, min_quant_size, master_weights, stochastic_rounding, seed, max_grad_norm, check_finite))

    def _lr(self, group: dict) -> Any:
        return 1.0 if group["lr"] is None else group["lr"]

    def _hyper(self, g: dict) -> dict:
        eps = g["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"eps must be a pair (eps1, eps2), got {eps!r}")
        hyper = {"eps": _number("eps[0]", eps[0]), "eps2": _number("eps[1]", eps[1]),
                 "clip_threshold": _number("clip_threshold", g["clip_threshold"]),
                 "decay_rate": _number("decay_rate", g["decay_rate"]),
                 "weight_decay": _number("weight_decay", g["weight_decay"]),
                 "scale_parameter": bool(g["scale_parameter"]), "relative_step": bool(g["relative_step"]),
                 "warmup_init": bool(g["warmup_init"]), "maximize": bool(g["maximize"]),
                 "first_moment": g["beta1"] is not None}
        if g["beta1"] is not None:
            hyper["beta1"] = _number("beta1", g["beta1"])
        return hyper


class AdamP(NibbleOptimizer):
    """AdamP (Heo et al. 2021): Adam without the radial part of the update for scale-invariant
    weights."""

    algorithm = "adamp"
    _torch_names = _BETAS

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, delta: float = 0.1, wd_ratio: float = 0.1,
                 nesterov: bool = False, *, maximize: bool = False, precision: Optional[str] = None,
                 block_size: int = 0, min_quant_size: int = 4096, master_weights: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0, max_grad_norm: float = 0.0, check_finite: bool = True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta,
                                      wd_ratio=wd_ratio, nesterov=nesterov, maximize=maximize),
                         **_settings(precision, block_size, min_quant_size, master_weights, stochastic_rounding, seed, max_grad_norm, check_finite))

    def _hyper(self, g: dict) -> dict:
        b1, b2 = _pair("betas", g["betas"])
        return {"beta1": b1, "beta2": b2, "eps": _number("eps", g["eps"]),
                "weight_decay": _number("weight_decay", g["weight_decay"]), "delta": _number("delta", g["delta"]),
                "wd_ratio": _number("wd_ratio", g["wd_ratio"]), "nesterov": bool(g["nesterov"]),
                "maximize": bool(g["maximize"])}


class QHM(NibbleOptimizer):
    """Quasi-hyperbolic momentum (Ma & Yarats 2019): nu-weighted mix of the gradient and momentum."""

    algorithm = "qhm"

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.999, nu: float = 0.7,
                 weight_decay: float = 0.0, *, maximize: bool = False, precision: Optional[str] = None,
                 block_size: int = 0, min_quant_size: int = 4096, master_weights: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0, max_grad_norm: float = 0.0, check_finite: bool = True) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, nu=nu, weight_decay=weight_decay, maximize=maximize),
                         **_settings(precision, block_size, min_quant_size, master_weights, stochastic_rounding, seed, max_grad_norm, check_finite))

    def _hyper(self, g: dict) -> dict:
        return {"momentum": _number("momentum", g["momentum"]), "nu": _number("nu", g["nu"]),
                "weight_decay": _number("weight_decay", g["weight_decay"]), "maximize": bool(g["maximize"])}


class SophiaG(NibbleOptimizer):
    """SophiaG (Liu et al. 2023): momentum preconditioned by an EMA of Hessian-diagonal estimates,
    given with update_hessian(); bs is the tokens per batch that scales rho."""

    algorithm = "sophiag"
    _torch_names = {**_BETAS, "batch_tokens": "bs"}

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 1e-1, bs: int = 5120, *, maximize: bool = False,
                 precision: Optional[str] = None, block_size: int = 0, min_quant_size: int = 4096,
                 master_weights: bool = False, stochastic_rounding: bool = False, seed: int = 0, max_grad_norm: float = 0.0, check_finite: bool = True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, bs=bs, maximize=maximize),
                         **_settings(precision, block_size, min_quant_size, master_weights, stochastic_rounding, seed, max_grad_norm, check_finite))

    def _hyper(self, g: dict) -> dict:
        b1, b2 = _pair("betas", g["betas"])
        return {"beta1": b1, "beta2": b2, "rho": _number("rho", g["rho"]),
                "weight_decay": _number("weight_decay", g["weight_decay"]),
                "batch_tokens": _number("bs", g["bs"]), "maximize": bool(g["maximize"])}

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
                    e, p = _dtensor.local(e), _dtensor.local(p)
                    if e.shape != p.shape:
                        raise ValueError(f"a Hessian estimate has shape {tuple(e.shape)}, its parameter {tuple(p.shape)}")
                    e = e.to(device=p.device, dtype=torch.float32).contiguous()
                keep.append(e)
            made.update_hessian(keep)


class ADOPT(NibbleOptimizer):
    """ADOPT (Taniguchi et al. 2024), as its authors' code: the gradient normalised by the second
    moment of the earlier steps, clipped to +-(step - 1)**clip_exponent (None: no clipping), then
    momentum; the first step only records the second moment. decouple: AdamW-style weight decay."""

    algorithm = "adopt"
    _torch_names = {**_BETAS, "decoupled_weight_decay": "decouple"}

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.9999),
                 eps: float = 1e-6, weight_decay: float = 0.0, decouple: bool = False,
                 clip_exponent: Optional[float] = 0.25, *, maximize: bool = False, precision: Optional[str] = None,
                 block_size: int = 0, min_quant_size: int = 4096, master_weights: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0, max_grad_norm: float = 0.0, check_finite: bool = True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decouple=decouple,
                                      clip_exponent=clip_exponent, maximize=maximize),
                         **_settings(precision, block_size, min_quant_size, master_weights, stochastic_rounding, seed, max_grad_norm, check_finite))

    def _hyper(self, g: dict) -> dict:
        b1, b2 = _pair("betas", g["betas"])
        clip = -1.0 if g["clip_exponent"] is None else _number("clip_exponent", g["clip_exponent"])
        return {"beta1": b1, "beta2": b2, "eps": _number("eps", g["eps"]),
                "weight_decay": _number("weight_decay", g["weight_decay"]),
                "decoupled_weight_decay": bool(g["decouple"]), "clip_exponent": clip, "maximize": bool(g["maximize"])}


class AdEMAMix(NibbleOptimizer):
    """AdEMAMix (Pagliardini et al. 2024), as its authors' code: Adam's fast EMA plus alpha times a
    slow EMA (betas[2]) over the same second moment, decoupled weight decay; alpha_warmup and
    beta3_warmup (steps, None: none) warm alpha up from 0 and beta3 up from betas[0]."""

    algorithm = "ademamix"
    _torch_names = {"beta1": "betas[0]", "beta2": "betas[1]", "beta3": "betas[2]"}

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 alpha: float = 2.0, beta3_warmup: Optional[int] = None, alpha_warmup: Optional[int] = None,
                 eps: float = 1e-8, weight_decay: float = 0.0, *, maximize: bool = False,
                 precision: Optional[str] = None, block_size: int = 0, min_quant_size: int = 4096,
                 master_weights: bool = False, stochastic_rounding: bool = False, seed: int = 0,
                 max_grad_norm: float = 0.0, check_finite: bool = True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha, beta3_warmup=beta3_warmup,
                                      alpha_warmup=alpha_warmup, eps=eps, weight_decay=weight_decay, maximize=maximize),
                         **_settings(precision, block_size, min_quant_size, master_weights, stochastic_rounding, seed, max_grad_norm, check_finite))

    def _hyper(self, g: dict) -> dict:
        betas = g["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 3:
            raise ValueError(f"betas must be three numbers, got {betas!r}")
        warmup = {k: 0.0 if g[k] is None else float(_integer(k, g[k])) for k in ("alpha_warmup", "beta3_warmup")}
        return {"beta1": _number("betas[0]", betas[0]), "beta2": _number("betas[1]", betas[1]),
                "beta3": _number("betas[2]", betas[2]), "alpha": _number("alpha", g["alpha"]),
                "eps": _number("eps", g["eps"]), "weight_decay": _number("weight_decay", g["weight_decay"]),
                "maximize": bool(g["maximize"]), **warmup}


class AdamWScheduleFree(NibbleOptimizer):
    """Schedule-free AdamW (Defazio et al. 2024), as schedulefree.AdamWScheduleFree: no lr
    schedule (warmup_steps warms lr up linearly), and two points per parameter: call train()
    before training steps and eval() before evaluating or saving the model, which moves the
    parameters to the averaged x. State: z (fp32 at every precision) and exp_avg_sq (at the
    requested one), plus per-parameter lr_max and weight_sum. One difference from the package: a
    new optimizer is in train mode (the package's starts in eval mode and needs train() before its
    first step; code that calls it works unchanged). `foreach` is accepted and ignored (nibble steps
    every tensor at once)."""

    algorithm = "adamw_schedulefree"
    _torch_names = _BETAS
    _runtime_keys = ("params", "lr", "train_mode")

    def __init__(self, params: Iterable, lr: float = 0.0025, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0,
                 weight_lr_power: float = 2.0, foreach: Optional[bool] = None, *, maximize: bool = False,
                 precision: Optional[str] = None, block_size: int = 0, min_quant_size: int = 4096,
                 master_weights: bool = False, stochastic_rounding: bool = False, seed: int = 0,
                 max_grad_norm: float = 0.0, check_finite: bool = True) -> None:
        del foreach
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                                      maximize=maximize, train_mode=True),
                         **_settings(precision, block_size, min_quant_size, master_weights, stochastic_rounding, seed, max_grad_norm, check_finite))

    def _hyper(self, g: dict) -> dict:
        b1, b2 = _pair("betas", g["betas"])
        return {"beta1": b1, "beta2": b2, "eps": _number("eps", g["eps"]),
                "weight_decay": _number("weight_decay", g["weight_decay"]),
                "warmup_steps": float(_integer("warmup_steps", g["warmup_steps"])), "r": _number("r", g["r"]),
                "weight_lr_power": _number("weight_lr_power", g["weight_lr_power"]), "maximize": bool(g["maximize"])}

    def _set_mode(self, train: bool) -> None:
        if len(self.state):
            self._load_assigned()
        for index, group in enumerate(self.param_groups):
            if group["train_mode"] == train:
                continue
            made = self._groups.get(index)  # none before the group's first step: no z to move to
            if made is not None:
                made.set_mode(train)
            group["train_mode"] = train

    @torch.no_grad()
    def train(self) -> None:
        """The parameters to y, where gradients are taken (no-op in train mode)."""
        self._set_mode(True)

    @torch.no_grad()
    def eval(self) -> None:
        """The parameters to x, the average to evaluate and save (no-op in eval mode)."""
        self._set_mode(False)

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        if not all(group["train_mode"] for group in self.param_groups):
            raise ValueError("AdamWScheduleFree is in eval mode (its parameters hold the averaged x): call "
                             "optimizer.train() before step()")
        return super().step(closure)


class Muon(NibbleOptimizer):
    """Muon (Jordan et al. 2024) with torch.optim.Muon's arguments and math (Nesterov momentum,
    Newton-Schulz orthogonalisation of the update, run by nibble in fp32 on the CPU, decoupled weight
    decay, lr times adjust_lr_fn's shape factor), and an AdamW fallback inside the same optimizer,
    as Keller Jordan's MuonWithAuxAdam: a group's use_muon None (the default) orthogonalises its
    parameters of rank >= 2 (higher ranks seen as (shape[0], rest), as conv weights) and steps the
    others (biases, norms) with AdamW at adamw_lr, adamw_betas, adamw_eps and adamw_weight_decay;
    lr's changes (schedulers) scale adamw_lr alike: it is taken relative to the group's base lr,
    kept in the group as "muon_base_lr" (saved with the state_dict) from its "initial_lr" when a
    scheduler had set one, else its lr when the group was added. use_muon True
    orthogonalises every parameter (each must have rank >= 2); use_muon False steps every one with
    AdamW, the group's lr and weight_decay then being AdamW's (MuonWithAuxAdam's groups). Give
    embeddings and output heads, which are matrices, a group with use_muon False."""

    algorithm = "muon"
    _torch_names = {"ns_a": "ns_coefficients[0]", "ns_b": "ns_coefficients[1]", "ns_c": "ns_coefficients[2]",
                    "adjust_lr": "adjust_lr_fn", "beta1": "adamw_betas[0]", "beta2": "adamw_betas[1]"}

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: Optional[str] = None, adamw_lr: float = 3e-4,
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-10,
                 adamw_weight_decay: float = 0.0, use_muon: Optional[bool] = None, *, maximize: bool = False,
                 precision: Optional[str] = None, block_size: int = 0, min_quant_size: int = 4096,
                 master_weights: bool = False, stochastic_rounding: bool = False, seed: int = 0,
                 max_grad_norm: float = 0.0, check_finite: bool = True) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                                      adjust_lr_fn=adjust_lr_fn, adamw_lr=adamw_lr, adamw_betas=adamw_betas,
                                      adamw_eps=adamw_eps, adamw_weight_decay=adamw_weight_decay, use_muon=use_muon,
                                      maximize=maximize),
                         **_settings(precision, block_size, min_quant_size, master_weights, stochastic_rounding, seed, max_grad_norm, check_finite))

    def _hyper(self, g: dict) -> dict:
        coefficients = g["ns_coefficients"]
        if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
            raise ValueError(f"ns_coefficients must be three numbers, got {coefficients!r}")
        use_muon = g["use_muon"]
        if use_muon not in (None, True, False):
            raise ValueError(f"use_muon must be None, True or False, got {use_muon!r}")
        adjust = "original" if g["adjust_lr_fn"] is None else g["adjust_lr_fn"]
        if not isinstance(adjust, str):
            raise ValueError(f"adjust_lr_fn must be None or a name, got {adjust!r}")
        b1, b2 = _pair("adamw_betas", g["adamw_betas"])
        hyper = {"weight_decay": _number("weight_decay", g["weight_decay"]),
                 "momentum": _number("momentum", g["momentum"]), "nesterov": bool(g["nesterov"]),
                 "eps": _number("eps", g["eps"]), "ns_steps": float(_integer("ns_steps", g["ns_steps"])),
                 "ns_a": _number("ns_coefficients[0]", coefficients[0]),
                 "ns_b": _number("ns_coefficients[1]", coefficients[1]),
                 "ns_c": _number("ns_coefficients[2]", coefficients[2]), "adjust_lr": adjust,
                 "beta1": b1, "beta2": b2, "adamw_eps": _number("adamw_eps", g["adamw_eps"]),
                 "maximize": bool(g["maximize"])}
        if use_muon is False:
            # Every tensor is AdamW's: the group's lr (as lr_scale) and weight decay are AdamW's.
            hyper.update(adamw_lr=1.0, adamw_weight_decay=hyper["weight_decay"])
            return hyper
        # The library scales both lrs by lr_scale (the group's lr), so the fallback's is given
        # relative to the group's base lr.
        base = _number("lr", g.get("muon_base_lr", g.get("initial_lr", g["lr"])))
        adamw_lr = _number("adamw_lr", g["adamw_lr"])
        if base <= 0.0 and use_muon is None and any(p.dim() < 2 for p in g["params"]):
            raise ValueError(f"Muon: a group with AdamW fallback parameters needs a base lr > 0 (adamw_lr is scaled "
                             f"by lr / base lr), got lr {base}; give it initial_lr, or the fallback parameters a "
                             "group with use_muon=False")
        hyper.update(adamw_lr=adamw_lr / base if base > 0.0 else adamw_lr,
                     adamw_weight_decay=_number("adamw_weight_decay", g["adamw_weight_decay"]))
        return hyper

    def _options(self, group: dict, device: torch.device) -> dict:
        return dict(super()._options(group, device), use_muon=group["use_muon"])

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        # The base of adamw_lr's scaling, fixed now: a later scheduler's initial_lr, or an lr changed
        # by hand before a save, would otherwise move the fallback's lr on a resume.
        group = self.param_groups[-1]
        group.setdefault("muon_base_lr", group.get("initial_lr", group["lr"]))


def _with_precision(base: type, precision: str, name: str) -> type:
    """An alias class whose precision defaults to `precision` (AdamW8bit, ...)."""
    return type(name, (base,), {"default_precision": precision, "__doc__": f"{base.__name__} with {precision} state."})


Adam8bit = _with_precision(Adam, "8bit", "Adam8bit")
Adam4bit = _with_precision(Adam, "4bit", "Adam4bit")
AdamW8bit = _with_precision(AdamW, "8bit", "AdamW8bit")
AdamW4bit = _with_precision(AdamW, "4bit", "AdamW4bit")
Lion8bit = _with_precision(Lion, "8bit", "Lion8bit")
AdEMAMix8bit = _with_precision(AdEMAMix, "8bit", "AdEMAMix8bit")
AdamFp8 = _with_precision(Adam, "fp8", "AdamFp8")
AdamWFp8 = _with_precision(AdamW, "fp8", "AdamWFp8")
LionFp8 = _with_precision(Lion, "fp8", "LionFp8")
AdEMAMixFp8 = _with_precision(AdEMAMix, "fp8", "AdEMAMixFp8")
AdamWScheduleFree8bit = _with_precision(AdamWScheduleFree, "8bit", "AdamWScheduleFree8bit")
Muon8bit = _with_precision(Muon, "8bit", "Muon8bit")
