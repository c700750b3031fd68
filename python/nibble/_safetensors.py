"""The safetensors files through which nibble's C library hands over an optimizer's state
(nibble_save writes one, nibble_load reads one): read into CPU tensors for state_dict(), written
from them for load_state_dict(). The C interface exchanges state only as files, and the package
depends on nothing but torch and numpy, so this small codec of the dtypes nibble's state uses stays."""
from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Any

import torch

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "U8": torch.uint8, "I64": torch.int64, "F64": torch.float64}
_NAMES = {v: k for k, v in _DTYPES.items()}


def read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (CPU, owning their memory) and the metadata of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    data = bytearray(raw[8 + size:])
    metadata = header.pop("__metadata__", {})
    # The library's writer records the data section's CRC-32C, which its reader checks; this reads
    # files the library has just written, and drops the record, which does not describe the
    # tensors a state_dict may later hold in their place.
    metadata.pop("nibble.crc32c", None)
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        flat = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=begin).clone() if end > begin \
            else torch.empty(0, dtype=torch.uint8)
        tensors[name] = flat.view(dtype).reshape(info["shape"])
    return tensors, metadata


def write_temporary(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Writes `tensors` and `metadata` to a new temporary safetensors file and returns its path (the
    caller deletes it). Refuses, before writing, an entry that is not a tensor of a dtype nibble's
    state uses."""
    header: dict[str, Any] = {}
    blobs = []
    offset = 0
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"state entry {name!r} is not a tensor")
        if t.dtype not in _NAMES:
            raise ValueError(f"state entry {name!r} has dtype {t.dtype}, which nibble's state does not use")
        t = t.detach().to("cpu").contiguous()
        blob = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items() if k != "nibble.crc32c"}
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    fd, path = tempfile.mkstemp(suffix=".safetensors", prefix="nibble-state-")
    with os.fdopen(fd, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    return path
