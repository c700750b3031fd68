"""ctypes binding of libnibble_c.so, nibble's C interface (include/nibble/c_api.h).

The library is found next to this file (an installed package), at $NIBBLE_LIBRARY, or in the
repository's build/ folder (a source checkout)."""
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

F32, BF16, F16 = 0, 1, 2

_ERRORS = {
    1: ValueError,  # invalid argument
    2: ValueError,  # state mismatch
    3: ValueError,  # format error
    4: OSError,
    5: MemoryError,
    6: RuntimeError,  # device error
    7: RuntimeError,
}


class NibbleParam(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("rank", ctypes.c_int32),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("data", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("dtype", ctypes.c_int32),
        ("grad_dtype", ctypes.c_int32),
        ("global_shape", ctypes.POINTER(ctypes.c_int64)),
        ("split", ctypes.c_int32),
    ]


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent
    found = [here / "libnibble_c.so"]
    if os.environ.get("NIBBLE_LIBRARY"):
        found.insert(0, Path(os.environ["NIBBLE_LIBRARY"]))
    found.append(here.parent.parent / "build" / "libnibble_c.so")
    return found


def _load() -> ctypes.CDLL:
    tried = []
    # NOTE: OpenMP threads that spin at barriers stall when another process takes a core. The
    # library's OpenMP runtime reads its wait settings when it loads; unless the user chose them,
    # it loads with a short spin (as the nibble CLI runs), and the environment is left as it was.
    short_spin = "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
    if short_spin:
        os.environ["GOMP_SPINCOUNT"] = "300"
    lib = None
    try:
        for path in _candidates():
            if path.is_file():
                lib = ctypes.CDLL(str(path))
                break
            tried.append(str(path))
    finally:
        if short_spin:
            del os.environ["GOMP_SPINCOUNT"]
    if lib is None:
        raise ImportError("nibble: libnibble_c.so not found (looked in " + ", ".join(tried) +
                          "); install with `pip install .` or build the repository and set NIBBLE_LIBRARY")
    vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    sigs = {
        "nibble_last_error": ([], ctypes.c_char_p),
        "nibble_cuda_available": ([], ctypes.c_int),
        "nibble_check_options": ([ctypes.c_char_p], ctypes.c_int),
        "nibble_tables_json": ([], ctypes.c_char_p),
        "nibble_create": ([ctypes.c_char_p, ctypes.POINTER(NibbleParam), i64, ctypes.POINTER(vp)], ctypes.c_int),
        "nibble_destroy": ([vp], None),
        "nibble_set_grads": ([vp, ctypes.POINTER(vp), i64, vp], ctypes.c_int),
        "nibble_step": ([vp, ctypes.c_float, ctypes.c_float, i32, vp, ctypes.POINTER(i32),
                         ctypes.POINTER(ctypes.c_double), ctypes.POINTER(i64)], ctypes.c_int),
        "nibble_grad_square_sum": ([vp, ctypes.POINTER(ctypes.c_uint8), i64, ctypes.POINTER(ctypes.c_double)],
                                   ctypes.c_int),
        "nibble_step_with_square_sum": ([vp, ctypes.c_float, ctypes.c_float, i32, ctypes.c_double, ctypes.POINTER(i32),
                                         ctypes.POINTER(ctypes.c_double), ctypes.POINTER(i64)], ctypes.c_int),
        "nibble_enqueue_step": ([vp, vp], ctypes.c_int),
        "nibble_enqueue_grad_square_sum": ([vp, ctypes.POINTER(ctypes.c_uint8), i64, vp, vp], ctypes.c_int),
        "nibble_enqueue_step_with_square_sum": ([vp, vp, vp], ctypes.c_int),
        "nibble_device_scalars": ([vp, ctypes.POINTER(vp), ctypes.POINTER(vp), ctypes.POINTER(vp),
                                   ctypes.POINTER(vp)], ctypes.c_int),
        "nibble_device_grad_norm": ([vp, ctypes.POINTER(vp)], ctypes.c_int),
        "nibble_counters": ([vp, ctypes.POINTER(i64), ctypes.POINTER(i64)], ctypes.c_int),
        "nibble_state_bytes": ([vp, ctypes.POINTER(i64), ctypes.POINTER(i64)], ctypes.c_int),
        "nibble_save": ([vp, ctypes.c_char_p], ctypes.c_int),
        "nibble_load": ([vp, ctypes.c_char_p], ctypes.c_int),
        "nibble_update_hessian": ([vp, ctypes.POINTER(vp), i64, vp], ctypes.c_int),
        "nibble_state_values": ([vp, i64, ctypes.c_char_p, vp, i64], ctypes.c_int),
        "nibble_set_state_values": ([vp, i64, ctypes.c_char_p, vp, i64], ctypes.c_int),
        "nibble_set_step_counts": ([vp, ctypes.POINTER(i64), i64, i64, i64], ctypes.c_int),
        "nibble_set_running_sums": ([vp, ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_double), i64],
                                    ctypes.c_int),
        "nibble_set_hyper": ([vp, ctypes.c_char_p, vp], ctypes.c_int),
        "nibble_train": ([vp], ctypes.c_int),
        "nibble_eval": ([vp], ctypes.c_int),
        "nibble_training": ([vp, ctypes.POINTER(i32)], ctypes.c_int),
    }
    for name, (args, result) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = result
    return lib


lib = _load()


def check(code: int) -> None:
    """Raises the Python exception for a non-zero nibble status, with the library's message."""
    if code != 0:
        message = lib.nibble_last_error().decode("utf-8", "replace")
        raise _ERRORS.get(code, RuntimeError)(message)


def tables() -> dict:
    """The library's algorithm, precision and hyperparameter tables (nibble_tables_json)."""
    text = lib.nibble_tables_json()
    if text is None:
        raise MemoryError(lib.nibble_last_error().decode())
    return json.loads(text.decode())


def cuda_available() -> bool:
    return bool(lib.nibble_cuda_available())
