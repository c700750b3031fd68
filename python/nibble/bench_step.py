# Times optimizer.step() alone, the figure the "optimizer step alone" comparisons publish: nibble's
# PyTorch optimizers against torch.optim.AdamW (and bitsandbytes / torchao when they import) on the
# parameters of a GPT preset with fixed random gradients, side by side in one process. Tables on
# stdout, every row in JSON / CSV. `python -m nibble.bench_step --help`.
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import bench_torch
from ._gpt import GPT, PRESETS, GPTConfig
from .bench_torch import BASELINE, DEFAULT_OPTIMIZERS, MIB, OPTIMIZERS, OptimizerSpec

GRAD_SCALE = 1e-3  # gradients are GRAD_SCALE * N(0, 1): the size of a trained GPT's


@dataclass
class Row:
    optimizer: str  # the name given to --optimizers
    label: str  # the name shown in the table
    implementation: str
    status: str  # "ok", "OOM" or "error"
    step_ms_median: float | None = None
    step_ms_min: float | None = None
    delta_pct: float | None = None  # median step time against the baseline's
    first_step_s: float | None = None  # the first step: state created, kernels compiled
    state_mib: float | None = None
    # ||p - p_baseline|| / ||p_baseline - p_0|| after all steps: how far this optimizer's update is
    # from the baseline's, relative to the baseline's (every optimizer steps AdamW on the same
    # gradients; a quantized state moves it by its rounding, a broken optimizer by about 1).
    update_error: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Settings:
    config_name: str
    config: GPTConfig
    device: torch.device
    optimizers: tuple[str, ...]
    steps: int
    warmup: int
    seed: int


class Problem:
    """The parameters every optimizer starts from and the gradients it steps with, made once."""

    def __init__(self, s: Settings) -> None:
        torch.manual_seed(s.seed)
        with s.device:
            model = GPT(s.config)
        self.start = [p.detach().clone() for p in model.parameters()]
        del model
        generator = torch.Generator(device=s.device).manual_seed(s.seed + 1)
        self.grads = [torch.randn(p.shape, generator=generator, device=s.device) * GRAD_SCALE for p in self.start]
        self.baseline_end: list[Tensor] | None = None

    def params(self) -> list[nn.Parameter]:
        params = [nn.Parameter(p.clone()) for p in self.start]
        for p, g in zip(params, self.grads):
            p.grad = g  # read by every optimizer, written by none
        return params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_times(optimizer: torch.optim.Optimizer, steps: int, device: torch.device) -> list[float]:
    """Milliseconds of each of `steps` calls of optimizer.step() (CUDA: events between the calls,
    the stream never waiting on the host)."""
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        _sync(device)
        events[0].record()
        for i in range(steps):
            optimizer.step()
            events[i + 1].record()
        _sync(device)
        return [a.elapsed_time(b) for a, b in zip(events, events[1:])]
    marks = [time.perf_counter()]
    for _ in range(steps):
        optimizer.step()
        marks.append(time.perf_counter())
    return [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]


def _update_error(end: Sequence[Tensor], baseline_end: Sequence[Tensor], start: Sequence[Tensor]) -> float:
    diff = sum(float(torch.sum((a.double() - b.double()) ** 2)) for a, b in zip(end, baseline_end))
    update = sum(float(torch.sum((b.double() - p.double()) ** 2)) for b, p in zip(baseline_end, start))
    return (diff / update) ** 0.5 if update > 0.0 else float("nan")


def _run(spec: OptimizerSpec, problem: Problem, s: Settings, row: Row) -> list[Tensor]:
    """Builds the optimizer over fresh parameters, times its first step, the warm-up and the timed
    steps, and fills row's figures; returns the parameters after the last step."""
    params = problem.params()
    optimizer, row.implementation = spec.build(params, s.device)
    _sync(s.device)
    start = time.perf_counter()
    optimizer.step()
    _sync(s.device)
    row.first_step_s = time.perf_counter() - start
    for _ in range(s.warmup - 1):
        optimizer.step()
    times = _step_times(optimizer, s.steps, s.device)
    row.step_ms_median = statistics.median(times)
    row.step_ms_min = min(times)
    row.state_mib = bench_torch.state_bytes(optimizer) / MIB
    return [p.detach() for p in params]


def prime(specs: Sequence[OptimizerSpec], device: torch.device) -> None:
    """One step of each optimizer on a small parameter before anything is timed, so that the
    process's one-time costs (libraries paged in, thread pools) fall on no optimizer's first step."""
    for spec in specs:
        p = nn.Parameter(torch.zeros(64, 64, device=device))
        p.grad = torch.ones_like(p)
        try:
            spec.build([p], device)[0].step()
        except Exception:  # the measured run that follows reports the failure
            pass
    _sync(device)


def measure(spec: OptimizerSpec, problem: Problem, s: Settings) -> Row:
    row = Row(spec.name, spec.label(s.device), spec.summary, "ok")
    gc.collect()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        end = _run(spec, problem, s, row)
        if spec.name == BASELINE:
            problem.baseline_end = end
            row.update_error = 0.0
        elif problem.baseline_end is not None:
            row.update_error = _update_error(end, problem.baseline_end, problem.start)
    # nibble reports a failed cudaMalloc of its state as MemoryError.
    except (torch.cuda.OutOfMemoryError, MemoryError) as error:
        row.status, row.error = "OOM", (str(error) or type(error).__name__).splitlines()[0]
    except Exception as error:  # one failing optimizer must not end the run: it becomes an error row
        traceback.print_exc(file=sys.stderr)
        row.status, row.error = "error", f"{type(error).__name__}: {error}"
    return row


def run_info(s: Settings, params: int) -> dict[str, Any]:
    return {
        "device": bench_torch._device_name(s.device),
        "device_type": s.device.type,
        "torch": torch.__version__,
        "config": s.config_name,
        "config_detail": f"{s.config.describe()}, {params / 1e6:.2f}M parameters",
        "params": params,
        "steps": s.steps,
        "warmup": s.warmup,
        "seed": s.seed,
        "hyper": dict(bench_torch.ADAMW_ARGS, betas=list(bench_torch.BETAS)),
        "grad_scale": GRAD_SCALE,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_table(rows: Sequence[Row]) -> str:
    lines = [f"{'optimizer':<14} {'step ms':>9} {'fastest':>9} {'Δ%':>7} {'first s':>8} {'state MiB':>10} "
             f"{'update err':>10}"]
    for r in rows:
        if r.status != "ok":
            lines.append(f"{r.label:<14} {r.status:>9}" + (f"  {r.error}" if r.status == "error" else ""))
            continue
        delta = "ref" if r.optimizer == BASELINE else _fmt(r.delta_pct, "+.1f")
        lines.append(f"{r.label:<14} {r.step_ms_median:>9.2f} {r.step_ms_min:>9.2f} {delta:>7} "
                     f"{r.first_step_s:>8.3f} {r.state_mib:>10.2f} {_fmt(r.update_error, '.2e'):>10}")
    lines.append(f"(step ms: median; Δ%: step time against {BASELINE}; first s: the first step, which creates "
                 f"the state and compiles; update err: distance of the final parameters from {BASELINE}'s over "
                 "the size of its update)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    optimizer_help = "\n".join(f"  {spec.name:<13} {spec.summary}" for spec in OPTIMIZERS.values())
    parser = argparse.ArgumentParser(
        prog="python -m nibble.bench_step",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Times optimizer.step() alone on the parameters of a GPT preset, with the same fixed random\n"
            f"gradients ({GRAD_SCALE:g} x N(0, 1)) for every optimizer, side by side in one process: each\n"
            "optimizer starts from the same parameters, runs AdamW with lr "
            f"{bench_torch.LR}, betas {bench_torch.BETAS},\n"
            f"weight decay {bench_torch.WEIGHT_DECAY}, eps {bench_torch.EPS}, and is timed over its own steps. "
            "Out of GPU memory\nbecomes an OOM row and the run goes on. The table goes to stdout, progress "
            "to stderr. The exit\nstatus is 1 when a run failed with another error or when every optimizer "
            "asked for was skipped."
        ),
        epilog=(
            "optimizers:\n" + optimizer_help + "\n\n"
            "The default list is " + ", ".join(DEFAULT_OPTIMIZERS) + ";\n"
            "any that cannot run here (a package that does not import, a nibble library without CUDA) is\n"
            "skipped, and the output says which and why.\n\n"
            "measures:\n"
            "  step ms     median and fastest time of one timed step (CUDA: events recorded between steps)\n"
            f"  Δ%          median step time against {BASELINE}'s\n"
            "  first s     the first step, synchronized: state created, kernels compiled (torchao)\n"
            "  state MiB   every tensor in optimizer.state_dict()['state'] (quantized codes, scales, maps)\n"
            f"  update err  ||p - p_{BASELINE}|| / ||p_{BASELINE} - p_0|| after the first, warm-up and timed\n"
            "              steps: 0 for the same update, about 1 for an optimizer that does not step"
        ),
    )
    parser.add_argument(
        "--config",
        choices=sorted(PRESETS),
        default="gpt2",
        help="whose parameters to step: gpt2 (GPT-2 124M, 124.5M parameters), char (10.8M), tiny (for tests) "
        "(default: gpt2)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="where the parameters and the optimizer live; auto: cuda when torch sees a GPU, else cpu "
        "(default: auto)",
    )
    parser.add_argument(
        "--optimizers",
        type=bench_torch._optimizers,
        default=DEFAULT_OPTIMIZERS,
        metavar="A,B,...",
        help="comma-separated optimizers to compare, from the list below (default: see below)",
    )
    parser.add_argument("--steps", type=bench_torch._steps, default=20, metavar="N",
                        help="timed steps per optimizer (default: 20)")
    parser.add_argument("--warmup", type=bench_torch._warmup, default=3, metavar="N",
                        help="steps before them, at least 1, the first timed on its own (default: 3)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed of the parameters and gradients (default: 0)")
    parser.add_argument("--json", type=bench_torch._report_path, metavar="FILE",
                        help="also write the run and every row as JSON")
    parser.add_argument("--csv", type=bench_torch._report_path, metavar="FILE", help="also write every row as CSV")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the comparison; returns 0, or 1 when a run failed with an error other than out-of-memory
    or when every optimizer asked for was skipped."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = bench_torch.resolve_device(parser, args.device)
    # The baseline runs first, so that every other row can be compared with its final parameters.
    ordered = sorted(args.optimizers, key=lambda name: name != BASELINE)
    s = Settings(args.config, PRESETS[args.config], device, tuple(ordered), args.steps, args.warmup, args.seed)

    runnable, skipped = bench_torch.available(s.optimizers, device)
    problem = Problem(s)
    info = run_info(s, sum(p.numel() for p in problem.start))
    print(f"nibble bench_step | device {info['device']} | torch {info['torch']} | config {info['config']} "
          f"({info['config_detail']}) | {s.steps} timed steps after {s.warmup} warm-up")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    sys.stdout.flush()
    if not runnable:
        print("nothing to measure: every optimizer asked for was skipped", file=sys.stderr)
        return 1

    prime(runnable, device)
    rows: list[Row] = []
    for i, spec in enumerate(runnable):
        print(f"[{i + 1}/{len(runnable)}] {spec.label(device)} ...", file=sys.stderr, flush=True)
        row = measure(spec, problem, s)
        if row.status == "ok":
            print(f"    {row.step_ms_median:.2f} ms/step, first step {row.first_step_s:.2f} s", file=sys.stderr)
        else:
            print(f"    {row.status}: {row.error}", file=sys.stderr)
        rows.append(row)
    base = next((r.step_ms_median for r in rows if r.optimizer == BASELINE and r.status == "ok"), None)
    for r in rows:
        if base is not None and r.step_ms_median is not None and r.optimizer != BASELINE:
            r.delta_pct = (r.step_ms_median / base - 1.0) * 100.0
    print()
    print(format_table(rows), flush=True)
    if args.json:
        bench_torch.write_json(args.json, info, skipped, rows)
    if args.csv:
        bench_torch.write_csv(args.csv, info, rows, Row, ("device", "torch", "config", "params", "steps", "warmup"))
    return 1 if any(r.status == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
