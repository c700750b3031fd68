# Benchmarks nibble's PyTorch optimizers against torch.optim.AdamW (and bitsandbytes / torchao when
# they import) by training a small GPT: tokens/s per batch size, median step time, peak memory and
# optimizer-state size, as tables on stdout and every row in JSON / CSV. `python -m nibble.bench_torch --help`.
from __future__ import annotations

import argparse
import csv
import ctypes
import dataclasses
import functools
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._gpt import GPT, PRESETS, GPTConfig

# One set of hyperparameters for every optimizer: GPT-2-style AdamW.
LR = 6e-4
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
EPS = 1e-8
ADAMW_ARGS: dict[str, Any] = {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY}

BASELINE = "torch-fused"
DEFAULT_BATCHES: dict[str, tuple[int, ...]] = {"char": (16, 32, 64, 128), "gpt2": (16,), "tiny": (4, 8)}
MIB = 1024 * 1024

# Builds an optimizer over the parameters on the device; returns it with a description of exactly
# what was built (which implementation, which package version).
Builder = Callable[[list[nn.Parameter], torch.device], tuple[torch.optim.Optimizer, str]]


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    summary: str  # one line for --help
    # Why it cannot run on this device (None: it can). Checked before anything is measured, so a
    # missing package becomes one "skipped" line instead of a failed row per batch size.
    unavailable: Callable[[torch.device], str | None]
    build: Builder
    # Device memory the optimizer holds outside PyTorch's caching allocator, which
    # torch.cuda.max_memory_allocated does not see and the CUDA peak must add: nibble's library
    # allocates its state with cudaMalloc. None: everything is in torch tensors.
    bytes_outside_torch: Callable[[torch.optim.Optimizer], int] | None = None

    def label(self, device: torch.device) -> str:
        # Fused AdamW is what "torch-fused" means on a GPU; on a CPU the row is plain "torch".
        return "torch" if self.name == BASELINE and device.type == "cpu" else self.name


@functools.cache
def _cpu_fused_adamw_works() -> bool:
    # Fused AdamW on CPU exists only in recent PyTorch; older versions refuse it at construction or
    # at the first step, so try both on a one-element parameter.
    p = nn.Parameter(torch.zeros(1))
    p.grad = torch.ones(1)
    try:
        torch.optim.AdamW([p], fused=True, **ADAMW_ARGS).step()
    except (RuntimeError, ValueError):
        return False
    return True


def _build_torch(params: list[nn.Parameter], device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    if device.type == "cuda" or _cpu_fused_adamw_works():
        return torch.optim.AdamW(params, fused=True, **ADAMW_ARGS), "torch.optim.AdamW(fused=True)"
    return torch.optim.AdamW(params, foreach=True, **ADAMW_ARGS), "torch.optim.AdamW(foreach=True)"


def _always_available(device: torch.device) -> str | None:
    return None


def _nibble_unavailable(device: torch.device) -> str | None:
    try:
        from . import AdamW, cuda_available  # noqa: F401  (imported to check that they load)
    except ImportError as error:
        return f"nibble's PyTorch classes do not import: {error}"
    if device.type == "cuda" and not cuda_available():
        return "this nibble library has no CUDA backend or sees no CUDA device (nibble.cuda_available() is False)"
    return None


def _nibble_builder(precision: str) -> Builder:
    def build(params: list[nn.Parameter], device: torch.device) -> tuple[torch.optim.Optimizer, str]:
        # Imported here, not at the top: the benchmark's torch rows must run while nibble's
        # library is missing, and _nibble_unavailable has already explained why these cannot.
        from . import AdamW

        return AdamW(params, precision=precision, **ADAMW_ARGS), f"nibble.AdamW(precision={precision!r})"

    return build


def _nibble_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    from . import NibbleOptimizer

    assert isinstance(optimizer, NibbleOptimizer)
    return optimizer.state_bytes()  # asks the library: no copy of the state


def _bnb_unavailable(device: torch.device) -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # bitsandbytes raises more than ImportError on a broken CUDA set-up
        return f"bitsandbytes does not import ({type(error).__name__}: {error})"
    return None


def _build_bnb(params: list[nn.Parameter], device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(params, **ADAMW_ARGS), f"bitsandbytes {bitsandbytes.__version__} AdamW8bit"


_TORCHAO_CLASSES = {"8bit": "AdamW8bit", "4bit": "AdamW4bit", "fp8": "AdamWFp8"}


def _torchao_unavailable(state: str) -> Callable[[torch.device], str | None]:
    """Why torchao's AdamW with this state cannot run here (None: it can); each row checks its own
    class, so a torchao without AdamWFp8 still runs the 8-bit and 4-bit rows."""

    def unavailable(device: torch.device) -> str | None:
        name = _TORCHAO_CLASSES[state]
        try:
            import torchao.optim
        except Exception as error:  # torchao imports compiled extensions that may fail to load
            return f"torchao.optim does not import ({type(error).__name__}: {error})"
        if not hasattr(torchao.optim, name):
            return f"this torchao ({getattr(torchao, '__version__', 'unknown version')}) has no torchao.optim.{name}"
        return None

    return unavailable


def _torchao_builder(state: str) -> Builder:
    """torchao's AdamW with "8bit", "4bit" or "fp8" state (AdamW8bit, AdamW4bit, AdamWFp8)."""

    def build(params: list[nn.Parameter], device: torch.device) -> tuple[torch.optim.Optimizer, str]:
        import torchao
        import torchao.optim

        cls = getattr(torchao.optim, _TORCHAO_CLASSES[state])
        return cls(params, **ADAMW_ARGS), f"torchao {torchao.__version__} {cls.__name__}"

    return build


def _nibble_spec(precision: str) -> OptimizerSpec:
    return OptimizerSpec(
        f"nibble-{precision}",
        f"nibble.AdamW(precision={precision!r})",
        _nibble_unavailable,
        _nibble_builder(precision),
        bytes_outside_torch=_nibble_state_bytes,
    )


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec(
            BASELINE,
            "torch.optim.AdamW(fused=True); on CPU labelled 'torch', fused where this PyTorch has it, else foreach",
            _always_available,
            _build_torch,
        ),
        *(_nibble_spec(precision) for precision in ("fp32", "bf16", "8bit", "4bit", "fp8")),
        OptimizerSpec("bnb-8bit", "bitsandbytes.optim.AdamW8bit", _bnb_unavailable, _build_bnb),
        *(OptimizerSpec(f"torchao-{state}", f"torchao.optim.{name}", _torchao_unavailable(state),
                        _torchao_builder(state)) for state, name in _TORCHAO_CLASSES.items()),
    )
}
DEFAULT_OPTIMIZERS = (
    "torch-fused",
    "nibble-fp32",
    "nibble-8bit",
    "nibble-4bit",
    "nibble-fp8",
    "bnb-8bit",
    "torchao-8bit",
    "torchao-4bit",
    "torchao-fp8",
)


@dataclass
class Row:
    optimizer: str  # the name given to --optimizers
    label: str  # the name shown in the table
    implementation: str
    batch: int
    status: str  # "ok", "OOM" or "error"
    tokens_per_s: float | None = None
    delta_pct: float | None = None  # tokens/s against the baseline at the same batch size
    step_ms_median: float | None = None
    step_ms_min: float | None = None
    peak_mib: float | None = None
    state_mib: float | None = None
    loss_first: float | None = None  # loss of the first step, before any update
    loss_last: float | None = None  # loss of the last timed step: every optimizer sees the same data
    error: str | None = None


@dataclass(frozen=True)
class Settings:
    config_name: str
    config: GPTConfig
    device: torch.device
    dtype: str
    batches: tuple[int, ...]
    optimizers: tuple[str, ...]
    steps: int
    warmup: int
    seed: int


# ---------------------------------------------------------------------------------------------
# Memory


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    # glibc keeps freed memory resident for reuse, so without trimming a run that follows a larger
    # one starts from an inflated RSS and shows almost no growth.
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


@functools.cache
def _can_reset_peak_rss() -> bool:
    # Linux resets a process's peak RSS (VmHWM) when "5" is written to /proc/self/clear_refs.
    return os.access("/proc/self/clear_refs", os.W_OK) and os.path.exists("/proc/self/status")


def peak_memory_measure(device: torch.device) -> str:
    """What the peak-memory figure of a run on this device is."""
    if device.type == "cuda":
        return "CUDA max_memory_allocated, plus the state of nibble rows, which nibble allocates outside PyTorch"
    if _can_reset_peak_rss():
        return "CPU peak RSS growth (VmHWM)"
    return "CPU peak RSS growth (getrusage high-water mark; 0 when an earlier run peaked higher)"


class PeakMemory:
    """The peak memory of one run, started before the model is built.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats(), i.e. everything PyTorch's
    allocator held at the peak (model, gradients, activations, optimizer state in torch tensors).
    CPU: how far the process's resident set grew above its size at the start. On Linux the kernel's
    high-water mark is reset for each run; elsewhere only getrusage's lifetime maximum is available.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # The previous run's model and optimizer, and those of a failed run kept alive by its
        # exception's frames until now, are freed before this run's baseline.
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            return
        trim = _malloc_trim()
        if trim is not None:
            trim(0)
        if _can_reset_peak_rss():
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.baseline = _proc_status_kib("VmRSS") * 1024
        else:
            self.baseline = _ru_maxrss_bytes()

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        peak = _proc_status_kib("VmHWM") * 1024 if _can_reset_peak_rss() else _ru_maxrss_bytes()
        return max(0, peak - self.baseline)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


def _ru_maxrss_bytes() -> int:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # macOS counts bytes, Linux KiB


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state, each storage counted once.

    Read from state_dict(), which for torch's own optimizers holds the same tensors as
    optimizer.state and through which nibble's classes hand out (as CPU copies) the state their
    library keeps: one method for every optimizer.
    Tensor subclasses (torchao's quantized state) report the nbytes of the tensor they stand for,
    so their inner tensors are counted instead.
    """
    seen: set[tuple[str, int, int]] = set()

    def walk(value: Any) -> int:
        if isinstance(value, Tensor):
            if type(value) is not Tensor and hasattr(value, "__tensor_flatten__"):
                names, _ = value.__tensor_flatten__()
                return sum(walk(getattr(value, name)) for name in names)
            key = (str(value.device), value.data_ptr(), value.nbytes)
            if key in seen:  # bitsandbytes shares one quantization map among parameters
                return 0
            seen.add(key)
            return value.nbytes
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        return 0

    return walk(optimizer.state_dict()["state"])


# ---------------------------------------------------------------------------------------------
# Measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train(spec: OptimizerSpec, batch: int, s: Settings, row: Row) -> None:
    """Builds the model and optimizer, runs the warm-up and timed steps, and fills row's figures."""
    memory = PeakMemory(s.device)
    torch.manual_seed(s.seed)
    with s.device:
        model = GPT(s.config)
    optimizer, row.implementation = spec.build(list(model.parameters()), s.device)
    shape = (batch, s.config.block_size)
    idx = torch.randint(s.config.vocab_size, shape, device=s.device)
    targets = torch.randint(s.config.vocab_size, shape, device=s.device)
    # bf16: activations under autocast, parameters, gradients and optimizer inputs in fp32.
    autocast = torch.autocast(device_type=s.device.type, dtype=torch.bfloat16, enabled=s.dtype == "bf16")

    def step() -> Tensor:
        with autocast:
            loss = model.loss(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()  # read after the timed loop: .item() here would synchronize every step

    first_loss = step()  # the first step's loss is from the untrained model, whatever warmup is
    for _ in range(s.warmup - 1):
        step()
    if s.device.type == "cuda":
        # The wall clock around the synchronized loop gives tokens/s; events on the stream give
        # each step's time without a host synchronization between steps.
        events = [torch.cuda.Event(enable_timing=True) for _ in range(s.steps + 1)]
        _sync(s.device)
        start = time.perf_counter()
        events[0].record()
        for i in range(s.steps):
            last_loss = step()
            events[i + 1].record()
        _sync(s.device)
        elapsed = time.perf_counter() - start
        step_ms = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
    else:
        marks = [time.perf_counter()]
        for _ in range(s.steps):
            last_loss = step()
            marks.append(time.perf_counter())
        elapsed = marks[-1] - marks[0]
        step_ms = [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]
    peak = memory.peak_bytes()  # before state_dict(), which may copy nibble's state to the host
    if spec.bytes_outside_torch is not None and s.device.type == "cuda":
        peak += spec.bytes_outside_torch(optimizer)
    state = state_bytes(optimizer)

    row.tokens_per_s = batch * s.config.block_size * s.steps / elapsed
    row.step_ms_median = statistics.median(step_ms)
    row.step_ms_min = min(step_ms)
    row.peak_mib = peak / MIB
    row.state_mib = state / MIB
    row.loss_first = first_loss.item()
    row.loss_last = last_loss.item()


def prime(specs: Sequence[OptimizerSpec], batch: int, s: Settings) -> None:
    """One short, unrecorded run of each optimizer before the sweep.

    The first run in a process pays once for what later runs find ready: library code paged in,
    thread pools, kernel selection and compilation (torchao), lazily allocated workspaces. Without
    this, whichever optimizer ran first would look slower and, on CPU, larger than the others.
    """
    short = dataclasses.replace(s, steps=1, warmup=1)
    for spec in specs:
        _progress(f"priming {spec.label(s.device)} (batch {batch}, 2 steps, not recorded) ...")
        try:
            _train(spec, batch, short, Row(spec.name, spec.label(s.device), spec.summary, batch, "ok"))
        except Exception:  # the measured runs that follow report the failure
            pass


def measure(spec: OptimizerSpec, batch: int, s: Settings) -> Row:
    row = Row(spec.name, spec.label(s.device), spec.summary, batch, "ok")
    try:
        _train(spec, batch, s, row)
    # nibble reports a failed cudaMalloc of its state as MemoryError.
    except (torch.cuda.OutOfMemoryError, MemoryError) as error:
        row.status, row.error = "OOM", (str(error) or type(error).__name__).splitlines()[0]
    except Exception as error:  # one failing optimizer must not end the sweep: it becomes an error row
        traceback.print_exc(file=sys.stderr)
        row.status, row.error = "error", f"{type(error).__name__}: {error}"
    return row


# ---------------------------------------------------------------------------------------------
# Output


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass  # keep platform's name
    return f"{name} (cpu, {torch.get_num_threads()} threads)"


def run_info(s: Settings) -> dict[str, Any]:
    with torch.device("meta"):  # counts parameters without allocating them
        params = GPT(s.config).num_params()
    dtype = "bf16 autocast, fp32 parameters" if s.dtype == "bf16" else "fp32"
    return {
        "device": _device_name(s.device),
        "device_type": s.device.type,
        "torch": torch.__version__,
        "dtype": dtype,
        "config": s.config_name,
        "config_detail": f"{s.config.describe()}, {params / 1e6:.2f}M parameters",
        "context": s.config.block_size,
        "params": params,
        "steps": s.steps,
        "warmup": s.warmup,
        "seed": s.seed,
        "hyper": {"lr": LR, "betas": list(BETAS), "weight_decay": WEIGHT_DECAY, "eps": EPS},
        "peak_memory": peak_memory_measure(s.device),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_table(batch: int, context: int, rows: Sequence[Row], peak_measure: str) -> str:
    lines = [
        f"batch {batch} ({batch * context:,} tokens/step)",
        f"{'optimizer':<14} {'tokens/s':>12} {'Δ%':>7} {'step ms':>9} {'peak MiB':>10} {'state MiB':>10}",
    ]
    for r in rows:
        if r.status != "ok":
            # An OOM message is long and in the JSON; an error's is what the reader needs to see.
            lines.append(f"{r.label:<14} {r.status:>12}" + (f"  {r.error}" if r.status == "error" else ""))
            continue
        delta = "ref" if r.optimizer == BASELINE else _fmt(r.delta_pct, "+.1f")
        lines.append(
            f"{r.label:<14} {r.tokens_per_s:>12,.0f} {delta:>7} {r.step_ms_median:>9.2f} "
            f"{r.peak_mib:>10.1f} {r.state_mib:>10.2f}"
        )
    lines.append(f"(step ms: median; peak: {peak_measure}; Δ%: tokens/s against {BASELINE})")
    return "\n".join(lines)


def _write_atomically(path: Path, write: Callable[[Any], None]) -> None:
    # A report is replaced whole or not at all, so an interrupted run never leaves half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, info: dict[str, Any], skipped: dict[str, str], rows: Sequence[Any]) -> None:
    report = {
        "run": info,
        "skipped": [{"optimizer": name, "reason": reason} for name, reason in skipped.items()],
        "rows": [asdict(r) for r in rows],
    }
    _write_atomically(path, lambda f: json.dump(report, f, indent=2))


CSV_RUN_FIELDS = ("device", "torch", "dtype", "config", "context", "steps", "warmup")


def write_csv(path: Path, info: dict[str, Any], rows: Sequence[Any], row_type: type = Row,
              run_fields: Sequence[str] = CSV_RUN_FIELDS) -> None:
    """Every row (a dataclass of row_type) as CSV. Each CSV row carries the run's settings named by
    run_fields, so that files from several runs can be concatenated."""
    names = list(run_fields) + [f.name for f in fields(row_type)]

    def write(f: Any) -> None:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: info[k] for k in run_fields}, **asdict(r)})

    _write_atomically(path, write)


# ---------------------------------------------------------------------------------------------
# Command line


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: must be at least 1")
    return value


def _batches(text: str) -> tuple[int, ...]:
    values = tuple(_positive_int(item.strip(), "batch size") for item in text.split(","))
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"batch sizes {text!r} name one twice")
    return values


def _optimizers(text: str) -> tuple[str, ...]:
    names = tuple(item.strip() for item in text.split(","))
    for name in names:
        if name not in OPTIMIZERS:
            raise argparse.ArgumentTypeError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"optimizers {text!r} name one twice")
    return names


def _steps(text: str) -> int:
    return _positive_int(text, "step count")


def _warmup(text: str) -> int:
    # At least one warm-up step: the first step allocates the optimizer state and selects kernels.
    return _positive_int(text, "warm-up step count")


def _report_path(text: str) -> Path:
    # Checked before anything is measured, so a typo does not cost a whole run.
    path = Path(text)
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: directory {str(path.parent)!r} does not exist")
    return path


def build_parser() -> argparse.ArgumentParser:
    optimizer_help = "\n".join(f"  {spec.name:<13} {spec.summary}" for spec in OPTIMIZERS.values())
    batch_help = ", ".join(f"{name}: {','.join(map(str, b))}" for name, b in DEFAULT_BATCHES.items())
    parser = argparse.ArgumentParser(
        prog="python -m nibble.bench_torch",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Trains a small GPT (random tokens, same seed and data for every optimizer) with each optimizer\n"
            "at each batch size and reports tokens/s, its difference in % against torch-fused, the median\n"
            "step time, peak memory and the optimizer state's size. Every optimizer runs AdamW with\n"
            f"lr {LR}, betas {BETAS}, weight decay {WEIGHT_DECAY}, eps {EPS}. A step is forward, backward,\n"
            "optimizer.step() and zero_grad(set_to_none=True). Before the sweep each optimizer runs two\n"
            "unrecorded steps, so that one-time costs (libraries paged in, compilation, workspaces) fall on\n"
            "no row. Out of GPU memory becomes an OOM row and the sweep goes on. Tables go to stdout,\n"
            "progress to stderr. The exit status is 1 when a run failed with another error or when\n"
            "every optimizer asked for was skipped."
        ),
        epilog=(
            "optimizers:\n" + optimizer_help + "\n\n"
            "The default list is " + ", ".join(DEFAULT_OPTIMIZERS) + ";\n"
            "any that cannot run here (a package that does not import, a nibble library without CUDA) is\n"
            "skipped, and the output says which and why.\n\n"
            "measures:\n"
            "  tokens/s    batch x context x timed steps / wall time of the timed loop (CUDA: synchronized\n"
            "              before and after)\n"
            "  step ms     median time of one timed step (CUDA: events recorded between steps)\n"
            "  peak MiB    CUDA: torch.cuda.max_memory_allocated since before the model was built, plus\n"
            "              nibble's state, which nibble allocates outside PyTorch's allocator;\n"
            "              CPU: growth of the process's peak resident set (VmHWM on Linux)\n"
            "  state MiB   every tensor in optimizer.state_dict()['state'] (quantized codes, scales, maps)\n"
            "  loss_first / loss_last (JSON, CSV): the first step's and the last timed step's loss"
        ),
    )
    parser.add_argument(
        "--config",
        choices=sorted(PRESETS),
        default="char",
        help="model preset: char (6 layers, width 384, context 256, vocabulary 65), gpt2 (GPT-2 124M: "
        "12 layers, width 768, context 1024, vocabulary 50304), tiny (2 layers, width 64, context 64; "
        "for tests) (default: char)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="where the model and optimizer run; auto: cuda when torch sees a GPU, else cpu (default: auto)",
    )
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        help="bf16: forward and backward under torch.autocast(device, torch.bfloat16), parameters and "
        "gradients (what the optimizers step) in fp32, as the published PyTorch figures are taken; "
        "nibble's bf16 parameters with fp32 master weights are not exposed to Python yet. "
        "fp32: no autocast, PyTorch's default matmul precision (default: bf16 on CUDA, fp32 on CPU, "
        "where most processors have no bf16 matrix instructions and emulated bf16 products would "
        "dominate the step)",
    )
    parser.add_argument(
        "--optimizers",
        type=_optimizers,
        default=DEFAULT_OPTIMIZERS,
        metavar="A,B,...",
        help="comma-separated optimizers to compare, from the list below (default: see below)",
    )
    parser.add_argument(
        "--batches",
        type=_batches,
        metavar="N,M,...",
        help=f"comma-separated batch sizes in sequences of the full context (default: {batch_help})",
    )
    parser.add_argument("--steps", type=_steps, default=50, metavar="N", help="timed steps per run (default: 50)")
    parser.add_argument(
        "--warmup",
        type=_warmup,
        default=5,
        metavar="N",
        help="untimed steps before them, at least 1: the first allocates the optimizer state, "
        "and compilers and autotuners run here (default: 5)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of the model's init and the tokens (default: 0)"
    )
    parser.add_argument("--json", type=_report_path, metavar="FILE", help="also write the run and every row as JSON")
    parser.add_argument("--csv", type=_report_path, metavar="FILE", help="also write every row as CSV")
    return parser


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_device(parser: argparse.ArgumentParser, choice: str) -> torch.device:
    """--device's device: auto is cuda when torch sees a GPU, else cpu; cuda without one is a usage
    error."""
    if choice == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def available(names: Sequence[str], device: torch.device) -> tuple[list[OptimizerSpec], dict[str, str]]:
    """The optimizers named that can run on the device, in order, and why each other one cannot."""
    runnable: list[OptimizerSpec] = []
    skipped: dict[str, str] = {}
    for name in names:
        reason = OPTIMIZERS[name].unavailable(device)
        if reason is None:
            runnable.append(OPTIMIZERS[name])
        else:
            skipped[name] = reason
    return runnable, skipped


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns 0, or 1 when a run failed with an error other than out-of-memory
    or when every optimizer asked for was skipped."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = resolve_device(parser, args.device)
    settings = Settings(
        config_name=args.config,
        config=PRESETS[args.config],
        device=device,
        dtype=args.dtype or ("bf16" if device.type == "cuda" else "fp32"),
        batches=args.batches or DEFAULT_BATCHES[args.config],
        optimizers=args.optimizers,
        steps=args.steps,
        warmup=args.warmup,
        seed=args.seed,
    )

    runnable, skipped = available(settings.optimizers, device)
    info = run_info(settings)
    print(
        f"nibble bench_torch | device {info['device']} | torch {info['torch']} | dtype {info['dtype']} | "
        f"config {info['config']} ({info['config_detail']}) | {settings.steps} timed steps after "
        f"{settings.warmup} warm-up"
    )
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    sys.stdout.flush()
    if not runnable:
        _progress("nothing to measure: every optimizer asked for was skipped")
        return 1

    prime(runnable, min(settings.batches), settings)
    rows: list[Row] = []
    total = len(runnable) * len(settings.batches)
    for b, batch in enumerate(settings.batches):
        batch_rows: list[Row] = []
        for o, spec in enumerate(runnable):
            _progress(f"[{b * len(runnable) + o + 1}/{total}] batch {batch} {spec.label(device)} ...")
            row = measure(spec, batch, settings)
            if row.status == "ok":
                _progress(f"    {row.tokens_per_s:,.0f} tokens/s, {row.step_ms_median:.2f} ms/step")
            else:
                _progress(f"    {row.status}: {row.error}")
            batch_rows.append(row)
        base = next((r.tokens_per_s for r in batch_rows if r.optimizer == BASELINE), None)
        for r in batch_rows:
            if base is not None and r.tokens_per_s is not None and r.optimizer != BASELINE:
                r.delta_pct = (r.tokens_per_s / base - 1.0) * 100.0
        rows.extend(batch_rows)
        print()
        print(format_table(batch, settings.config.block_size, batch_rows, info["peak_memory"]), flush=True)

    if args.json:
        write_json(args.json, info, skipped, rows)
    if args.csv:
        write_csv(args.csv, info, rows)
    return 1 if any(r.status == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
