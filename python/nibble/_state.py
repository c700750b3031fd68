"""state_dict() and load_state_dict() of nibble's optimizers: the library's state as PyTorch's
per-parameter layout (plain, or DTensors for torch.distributed.checkpoint when sharded), loaded
back whole, through load_state_dict, or entry by entry, through `optimizer.state[param]`."""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from . import _safetensors
from ._dtensor import as_dtensor_like, is_dtensor, local
from ._handle import GroupHandle

if TYPE_CHECKING:
    from .optim import NibbleOptimizer

SHARDED_FORMAT = "nibble.sharded_state"


def _numbered(opt: "NibbleOptimizer") -> Iterator[tuple[int, dict, int]]:
    """(index, group, number of its first parameter) per parameter group: state_dict() numbers the
    parameters of all groups in order, as torch.optim does."""
    first = 0
    for index, group in enumerate(opt.param_groups):
        yield index, group, first
        first += len(group["params"])


def state_dict(opt: "NibbleOptimizer") -> dict:
    """PyTorch's layout, {"state": {number: {"step", ...}}, "param_groups": [...]}: each group's
    settings and parameter numbers, and for a group with parameters, nibble's sections (see
    _plain_group and _sharded_group) and one state entry per parameter."""
    per_group: Callable[[NibbleOptimizer, int, dict], tuple[dict, list[dict]]] = \
        _sharded_group if opt._mesh is not None else _plain_group
    state: dict[int, dict[str, torch.Tensor]] = {}
    groups = []
    for index, group, first in _numbered(opt):
        saved = {k: v for k, v in group.items() if k != "params"}
        count = len(group["params"])
        saved["params"] = list(range(first, first + count))
        if count:
            sections, entries = per_group(opt, index, group)
            saved.update(sections)
            for i, entry in enumerate(entries):
                state[first + i] = entry
        groups.append(saved)
    return {"state": state, "param_groups": groups}


def _plain_group(opt: "NibbleOptimizer", index: int, group: dict) -> tuple[dict, list[dict]]:
    """The library's state file as it is: per parameter "step" and its state tensors (quantized ones
    as "<name>.codes" and "<name>.absmax"), the file's metadata as "nibble" and its codebooks as
    "nibble_codebooks"."""
    tensors, metadata = opt._nibble(index).save()
    codebooks = {k: v for k, v in tensors.items() if k.startswith("codebook.")}
    steps = tensors["steps"]
    entries = []
    for i in range(len(group["params"])):
        entry: dict[str, torch.Tensor] = {"step": steps[i].to(torch.float32)}
        prefix = f"state.{i}."
        for name, t in tensors.items():
            if name.startswith(prefix):
                entry[name[len(prefix):]] = t
        entries.append(entry)
    return {"nibble": metadata, "nibble_codebooks": codebooks}, entries


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

def _sharded_group(opt: "NibbleOptimizer", index: int, group: dict) -> tuple[dict, list[dict]]:
    """The state of a sharded group, for torch.distributed.checkpoint (DCP): per parameter "step"
    and one DTensor per state tensor (exp_avg, exp_avg_sq, master, ...) shaped like the parameter,
    quantized state dequantized to fp32; the "nibble" section names the format, the algorithm, the
    step counts and every parameter's global shape and state names."""
    made = opt._nibble(index)
    tensors, metadata = made.save()
    layout = json.loads(metadata["layout"])
    whole = _whole_factors(opt, group["params"], layout, tensors) if metadata["algorithm"] == "adafactor" else {}
    # "step" and schedule-free AdamW's lr_max and weight_sum are plain tensors, the same on every
    # rank: a rank whose shard is empty counts the steps too (see NibbleOptimizer._set_grads).
    running = _RUNNING if metadata["algorithm"] == "adamw_schedulefree" else ()
    described = []
    entries = []
    for i, p in enumerate(group["params"]):
        names = whole[i]["names"] if i in whole else _state_names(layout[i])
        entry: dict[str, torch.Tensor] = {"step": tensors["steps"][i].to(torch.float32)}
        for name in running:
            entry[name] = tensors[f"state.{i}.{name}"].reshape(1).to(torch.float64)
        for name in names:
            if name in _FACTORS and i in whole:
                entry[name] = whole[i]["factors"][name]
            else:
                entry[name] = _sharded_entry(made, i, p, name, tensors)
        entries.append(entry)
        described.append({"shape": list(p.shape), "precision": layout[i]["precision"], "state": names})
    return {"nibble": {"format": SHARDED_FORMAT, "algorithm": metadata["algorithm"], "step": metadata["step"],
                       "skipped": metadata["skipped"], "layout": json.dumps(described)}}, entries


_FACTORS = ("exp_avg_sq_row", "exp_avg_sq_col")
_RUNNING = ("lr_max", "weight_sum")  # schedule-free AdamW's per-parameter sums


def _process_group(opt: "NibbleOptimizer") -> Any:
    """The process group over the optimizer's device mesh (None: the default group)."""
    mesh = opt._mesh
    return mesh.get_group() if mesh.ndim == 1 else None


def _is_split_placement(p: torch.Tensor) -> bool:
    return is_dtensor(p) and not all(pl.is_replicate() for pl in p.placements)


# NOTE: factored Adafactor runs only on tensors that no rank splits (the library refuses a split
# one). Under a sharded placement such a tensor is whole on one rank and empty on the others, which
# keep an empty unfactored slot instead of its factors. A checkpoint must hold the same entries on
# every rank, so the rank that holds the tensor gives its state names and factors to all ranks
# (one all_gather_object for the names and shapes, one all_reduce per factor: the holder's values
# plus zeros), and the factors are saved as plain tensors, as a replicated tensor's are.

def _whole_factors(opt: "NibbleOptimizer", params: list, layout: list[dict],
                   tensors: dict[str, torch.Tensor]) -> dict[int, dict]:
    """{parameter index: {"names": the holder's state names, "factors": {name: tensor}}} for the
    factored parameters of a sharded placement, the same on every rank. The library factors a
    tensor of two or more dimensions that is not empty; when a sharded group holds such tensors,
    every rank must take the state_dict (as torch.distributed.checkpoint does)."""
    if not any(_is_split_placement(p) and p.dim() >= 2 and p.numel() > 0 for p in params):
        return {}
    mine = {i: {"names": _state_names(layout[i]),
                "shapes": {name: list(tensors[f"state.{i}.{name}"].shape) for name in _FACTORS}}
            for i, p in enumerate(params) if _is_split_placement(p) and layout[i].get("factored")}
    process_group = _process_group(opt)
    device = local(params[0]).device  # the collective's device: NCCL reduces CUDA tensors only
    gathered: list = [None] * torch.distributed.get_world_size(process_group)
    torch.distributed.all_gather_object(gathered, mine, group=process_group)
    found: dict[int, dict] = {}
    for held in gathered:
        found.update(held)
    whole = {}
    for i in sorted(found):
        factors = {}
        for name in _FACTORS:
            values = (tensors[f"state.{i}.{name}"].to(device=device, dtype=torch.float32, copy=True) if i in mine
                      else torch.zeros(found[i]["shapes"][name], dtype=torch.float32, device=device))
            torch.distributed.all_reduce(values, group=process_group)
            factors[name] = values
        whole[i] = {"names": found[i]["names"], "factors": factors}
    return whole


def _sharded_entry(made: GroupHandle, i: int, p: torch.Tensor, name: str,
                   tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if name in _FACTORS:  # a replicated tensor's factors: the same on every rank
        return tensors[f"state.{i}.{name}"]
    shape = local(p).shape
    if f"state.{i}.{name}" in tensors:  # fp32 or bf16: exactly as held
        values = tensors[f"state.{i}.{name}"].reshape(shape)
    else:
        values = torch.empty(shape, dtype=torch.float32)
        made.state_values(i, name, values)
    # On the parameter's device, as its shards are (the library hands state over on the host).
    return as_dtensor_like(values.to(local(p).device), p)


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


def load_state_dict(opt: "NibbleOptimizer", state_dict: dict) -> None:
    """Replaces every group's settings and state with the state_dict's, after checking all of it:
    a refused state_dict leaves the optimizer as it was."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(groups) if isinstance(groups, list) else 'no'} parameter groups, "
                         f"this optimizer has {len(opt.param_groups)}")
    for index, (saved, group) in enumerate(zip(groups, opt.param_groups)):
        if len(saved.get("params", ())) != len(group["params"]):
            raise ValueError(f"parameter group {index} of the state_dict holds {len(saved.get('params', ()))} "
                             f"parameters, this optimizer's holds {len(group['params'])}")
    if opt._mesh is not None:
        _load_sharded(opt, state_dict, groups)
        return
    for index, saved in enumerate(groups):
        meta = saved.get("nibble")
        if isinstance(meta, dict) and meta.get("format") == SHARDED_FORMAT:
            raise ValueError(f"parameter group {index}: the state_dict is the state of a sharded optimizer "
                             "(DTensor parameters); load it into one over the same sharded parameters")
    # A nibble optimizer made anew from each group's saved settings and loaded (the library checks
    # the state against it); only when every group has passed do the groups take them, so a
    # refused state_dict changes nothing.
    updated = _saved_settings(opt, groups)
    fresh: dict[int, GroupHandle] = {}
    for index, (saved, group) in enumerate(zip(groups, updated)):
        if not group["params"]:
            continue
        if "nibble" not in saved:
            fresh[index] = _from_torch(opt, index, saved, group, state_dict.get("state", {}))
            continue
        tensors: dict[str, torch.Tensor] = dict(saved.get("nibble_codebooks", {}))
        steps = []
        for i, key in enumerate(saved["params"]):
            entry = state_dict.get("state", {}).get(key, {})
            step = entry.get("step", 0)
            steps.append(int(step.item() if isinstance(step, torch.Tensor) else step))
            for name, t in entry.items():
                if name == "step":
                    continue
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"parameter {key!r} (group {index}, position {i}): state {name!r} is "
                                     f"{type(t).__name__}, not a tensor")
                tensors[f"state.{i}.{name}"] = t  # dtypes and shapes are the library's to check
        tensors["steps"] = torch.tensor(steps, dtype=torch.int64)
        path = _safetensors.write_temporary(tensors, saved.get("nibble", {}))
        try:
            made = opt._create(index, group)
            made.load(path)
        except ValueError as e:
            raise ValueError(f"parameter group {index} of the state_dict: {str(e).replace(path, 'its state')}") from None
        finally:
            os.unlink(path)
        fresh[index] = made
    _swap_in(opt, updated, fresh)


def _from_torch(opt: "NibbleOptimizer", index: int, saved: dict, group: dict, state: dict) -> GroupHandle:
    """A group of a torch.optim state_dict (no "nibble" section): a nibble optimizer over the group
    whose state tensors take the saved fp32 ones of the same names (exp_avg, exp_avg_sq,
    max_exp_avg_sq, momentum_buffer, ...), quantized to the group's precision, and whose step counts
    take the saved steps. A parameter without an entry has not stepped (zero state, step 0). The
    entries must hold exactly the state this optimizer keeps: another algorithm's is refused by name."""
    if opt.algorithm == "adamw_schedulefree":
        raise ValueError(f"parameter group {index} of the state_dict has no nibble section: schedule-free "
                         "AdamW's averaging weights are not in a torch.optim-style state_dict, so only nibble's "
                         "own state_dict loads")
    made = opt._create(index, group)
    layout = json.loads(made.save()[1]["layout"])
    tensor_steps = []
    for i, (key, p) in enumerate(zip(saved["params"], group["params"])):
        where = f"parameter {key!r} (group {index}, position {i})"
        entry = {name: t for name, t in state.get(key, {}).items() if t is not None}  # SGD: momentum_buffer None
        if _BNB_STATE in entry or "state1" in entry:
            entry = _from_bitsandbytes(opt.algorithm, entry, where)
        if not entry:
            tensor_steps.append(0)
            continue
        names = [name for name in _state_names(layout[i]) if name != "master"]  # master: the parameter itself
        if opt.algorithm == "sgd" and "step" not in entry:
            # torch.optim.SGD counts no steps; a parameter with a momentum buffer has taken at least
            # one, and SGD's math after its first step does not depend on the count.
            entry["step"] = 1
        found = sorted(name for name in entry if name != "step")
        if "step" not in entry or found != sorted(names):
            raise ValueError(f"{where}: the state_dict holds {sorted(entry)}, this optimizer ({opt.algorithm}) "
                             f"keeps {sorted(['step', *names])}")
        step = entry["step"]
        step = float(step.item() if isinstance(step, torch.Tensor) else step)
        if step != int(step) or step < 0:
            raise ValueError(f"{where}: the state_dict's step is {step}, not a whole number >= 0")
        tensor_steps.append(int(step))
        for name in names:
            t = entry[name]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"{where}: state {name!r} is {type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}, "
                                 "not a floating-point tensor")
            if t.numel() != local(p).numel():
                raise ValueError(f"{where}: state {name!r} has shape {list(t.shape)}, the parameter "
                                 f"{list(p.shape)}")
            try:
                made.set_state_values(i, name, t.detach().to(device="cpu", dtype=torch.float32).contiguous())
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
    made.set_step_counts(tensor_steps, max(tensor_steps, default=0), 0)
    return made


# NOTE: bitsandbytes' optimizers keep per parameter "step" and state1 / state2 (under
# "__bnb_optimizer_quant_state__" in its state_dicts): uint8 codes of their maps qmap1 / qmap2
# with one absmax per block of 256 elements in absmax1 / absmax2, or fp32 values for tensors kept
# at 32 bits. Its dynamic maps are nibble's 8-bit tree maps, so the dequantized values re-encode to
# the same codes wherever the block's absmax comes back the same.
_BNB_STATE = "__bnb_optimizer_quant_state__"
_BNB_NAMES = {"adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq"), "lion": ("exp_avg",),
              "sgd": ("momentum_buffer",)}
_BNB_BLOCK = 256


def _from_bitsandbytes(algorithm: str, entry: dict, where: str) -> dict:
    """A bitsandbytes state entry as a torch.optim one: "step" and the fp32 state under nibble's
    (and torch's) names."""
    if algorithm not in _BNB_NAMES:
        raise ValueError(f"{where}: the state_dict holds bitsandbytes state; nibble reads it for "
                         f"{', '.join(sorted(_BNB_NAMES))}, not {algorithm}")
    quant = dict(entry.get(_BNB_STATE, {}), **{k: v for k, v in entry.items() if k not in ("step", _BNB_STATE)})
    out: dict[str, Any] = {"step": entry["step"]} if "step" in entry else {}
    names = _BNB_NAMES[algorithm]
    for n, name in enumerate(names, start=1):
        values = quant.get(f"state{n}")
        if not isinstance(values, torch.Tensor):
            raise ValueError(f"{where}: the bitsandbytes state has no tensor state{n} ({name})")
        if values.dtype == torch.uint8:
            qmap, absmax = quant.get(f"qmap{n}"), quant.get(f"absmax{n}")
            blocks = (values.numel() + _BNB_BLOCK - 1) // _BNB_BLOCK
            if not isinstance(qmap, torch.Tensor) or qmap.numel() != 256:
                raise ValueError(f"{where}: bitsandbytes' 8-bit state{n} needs qmap{n} of 256 values")
            if not isinstance(absmax, torch.Tensor) or absmax.numel() != blocks:
                raise ValueError(f"{where}: bitsandbytes' 8-bit state{n} of {values.numel()} elements needs "
                                 f"absmax{n} of {blocks} blocks of {_BNB_BLOCK}, got "
                                 f"{absmax.numel() if isinstance(absmax, torch.Tensor) else absmax!r}")
            codes = values.reshape(-1).to("cpu").long()
            scales = absmax.reshape(-1).to("cpu", torch.float32).repeat_interleave(_BNB_BLOCK)[:codes.numel()]
            values = qmap.reshape(-1).to("cpu", torch.float32)[codes] * scales
        out[name] = values
    unknown = sorted(k for k in quant if not any(k == f"{kind}{n}" for kind in ("state", "qmap", "absmax")
                                               for n in range(1, len(names) + 1)))
    if unknown:
        raise ValueError(f"{where}: the bitsandbytes state holds {unknown}, which nibble's {algorithm} does not keep")
    return out


def _saved_settings(opt: "NibbleOptimizer", groups: list) -> list[dict]:
    """Each group's settings as the state_dict gives them (its parameters as they are), checked.
    The state_dict of another library (torch.optim, bitsandbytes) sets the settings nibble's group
    has (lr, betas, ...) and no others."""
    updated = []
    for index, (saved, group) in enumerate(zip(groups, opt.param_groups)):
        merged = dict(group)
        foreign = "nibble" not in saved
        merged.update({k: v for k, v in saved.items()
                       if k not in ("params", "nibble", "nibble_codebooks") and (k in group or not foreign)})
        try:
            opt._check_group(merged)
        except ValueError as e:
            raise ValueError(f"parameter group {index} of the state_dict: {e}") from None
        updated.append(merged)
    return updated


def _swap_in(opt: "NibbleOptimizer", updated: list[dict], fresh: dict[int, GroupHandle]) -> None:
    """Everything checked and loaded: the groups take the saved settings, and each its new nibble
    optimizer (a group without parameters keeps none)."""
    for index, merged in enumerate(updated):
        opt.param_groups[index].update({k: v for k, v in merged.items() if k != "params"})
        opt._groups.pop(index, None)
    for index, made in fresh.items():
        made.key = opt._fixed_key(opt.param_groups[index])
        opt._register(index, made)


def _load_sharded(opt: "NibbleOptimizer", state_dict: dict, groups: list) -> None:
    """Checks the whole sharded state against the optimizer, builds each group's nibble optimizer
    anew from it, and only then swaps them in: a refused state changes nothing."""
    updated = _saved_settings(opt, groups)
    fresh: dict[int, GroupHandle] = {}
    for index, (saved, group) in enumerate(zip(groups, updated)):
        if not group["params"]:
            continue
        meta = saved.get("nibble")
        if not isinstance(meta, dict) or meta.get("format") != SHARDED_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise ValueError(f"parameter group {index}: the state_dict is not a sharded nibble state (format "
                             f"{found!r}, expected {SHARDED_FORMAT!r}); a sharded optimizer loads the state_dict "
                             "of a sharded one (any world size), e.g. through torch.distributed.checkpoint")
        if meta.get("algorithm") != opt.algorithm:
            raise ValueError(f"parameter group {index}: the state_dict holds {meta.get('algorithm')!r} state, this "
                             f"optimizer runs {opt.algorithm!r}")
        described = json.loads(meta["layout"])
        if len(described) != len(group["params"]):
            raise ValueError(f"parameter group {index}: the state_dict describes {len(described)} parameters, "
                             f"this optimizer's group holds {len(group['params'])}")
        made = opt._create(index, group)
        live = json.loads(made.save()[1]["layout"])
        tensor_steps = []
        running: dict[str, list[float]] = {}
        for i, (key, p) in enumerate(zip(saved["params"], group["params"])):
            where = f"parameter {key!r} (group {index}, position {i})"
            if list(described[i]["shape"]) != list(p.shape):
                raise ValueError(f"{where}: the state_dict's global shape is {described[i]['shape']}, this "
                                 f"optimizer's parameter has {list(p.shape)}")
            names = _state_names(live[i])
            # A factored tensor that a sharded placement leaves whole on another rank: this rank's
            # shard is empty, and it keeps no factors to load.
            empty_here = _is_split_placement(p) and local(p).numel() == 0 and \
                any(name in _FACTORS for name in described[i]["state"])
            if empty_here:
                names = list(described[i]["state"])
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
            for name in _RUNNING if opt.algorithm == "adamw_schedulefree" else ():
                value = entry.get(name)
                if not isinstance(value, torch.Tensor) or value.numel() != 1:
                    raise ValueError(f"{where}: the state_dict has no one-element tensor {name!r}")
                running.setdefault(name, []).append(float(value.item()))
            for name in ([] if empty_here else names):
                t = entry[name]
                if is_dtensor(t) and list(t.shape) != list(p.shape):
                    raise ValueError(f"{where}: state {name!r} has global shape {list(t.shape)}, the parameter "
                                     f"{list(p.shape)}")
                made.set_state_values(i, name, local(t).detach().to(device="cpu", dtype=torch.float32).contiguous())
        made.set_step_counts(tensor_steps, _count(meta, "step"), _count(meta, "skipped"))
        if running:
            made.set_running_sums(running["lr_max"], running["weight_sum"])
        fresh[index] = made
    _swap_in(opt, updated, fresh)


def load_assigned(opt: "NibbleOptimizer") -> None:
    """Loads the entries assigned to `optimizer.state[param]` into nibble's state. torch's
    ZeroRedundancyOptimizer restores a checkpoint that way: its load_state_dict writes each of
    this rank's entries of the consolidated state_dict (the per-parameter entries of nibble's
    state_dict()) into the local optimizer's `state` and never calls the local load_state_dict.
    The other parameters keep their state; each group's step count becomes at least the
    largest per-parameter step. Empty entries (left by reading `state[param]`) are dropped. On
    a refusal the entries stay, so every later step refuses too rather than train without them."""
    assigned = [(p, entry) for p, entry in opt.state.items() if not (isinstance(entry, dict) and not entry)]
    if not assigned:
        opt.state.clear()
        return
    if opt._mesh is not None:
        raise ValueError(f"optimizer.state was assigned state for {len(assigned)} parameter(s) of a sharded "
                         "(DTensor) optimizer, which nibble does not read from there; load a sharded state with "
                         "load_state_dict (e.g. through torch.distributed.checkpoint)")
    where = {}
    for index, group, first in _numbered(opt):
        for i, p in enumerate(group["params"]):
            where[id(p)] = (first + i, index, i)
    current = state_dict(opt)
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
    load_state_dict(opt, current)
    opt.state.clear()
