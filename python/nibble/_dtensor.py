"""torch.distributed's DTensor as nibble sees it: whether a parameter is one, this rank's piece of
it, and how its placements spread it over the ranks (which decides the library's `split` flag and
which rank counts it in the gradient norm)."""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch


@functools.lru_cache(maxsize=None)
def dtensor_class() -> Optional[type]:
    """torch's DTensor, or None where this torch has no torch.distributed."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor (the tensor itself otherwise), sharing its storage."""
    return t.to_local() if is_dtensor(t) else t


def layout(p: torch.Tensor) -> tuple[bool, bool]:
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


def as_dtensor_like(values: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`values`, this rank's piece, as a DTensor placed like the parameter `p` (p itself if plain)."""
    if not is_dtensor(p):
        return values
    return dtensor_class().from_local(values, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                      stride=p.stride())
