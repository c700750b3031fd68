# nibble's training engine side by side with a PyTorch GPT: one recipe (shapes, text, optimizer,
# schedule, clipping) trained by `nibble train` and by a PyTorch model that follows nanoGPT's
# (karpathy/nanoGPT model.py and train.py), over several seeds, printing ms/step, tokens/s and the
# final validation loss of both, with their spread; optionally again with a competing busy process
# on one core. `python -m nibble.bench_engine --help`.
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ._gpt import GPT, GPTConfig
from .bench_torch import _positive_int

FORTUNES = Path("/usr/share/games/fortunes")
# The longest a busy process may live, whatever happens to this benchmark: it ends itself.
BUSY_LIMIT_S = 6 * 3600


@dataclass(frozen=True)
class Recipe:
    """nanoGPT's CPU recipe for its character-level Shakespeare model (its README's "baby GPT")."""

    layers: int = 4
    heads: int = 4
    width: int = 128
    context: int = 64
    batch: int = 12
    steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_batches: int = 50
    val_fraction: float = 0.1


@dataclass
class Run:
    engine: str  # "nibble" or "torch"
    load: str    # "idle" or "busy"
    seed: int
    steps: int
    step_ms_median: float
    step_ms_p10: float
    step_ms_p90: float
    tokens_per_s: float
    val_loss: float
    detail: str = ""


@dataclass
class Summary:
    engine: str
    load: str
    runs: list[Run] = field(default_factory=list)

    @property
    def step_ms(self) -> float:
        return statistics.median(r.step_ms_median for r in self.runs)

    @property
    def val_mean(self) -> float:
        return statistics.fmean(r.val_loss for r in self.runs)

    @property
    def val_spread(self) -> float:
        """Half the range of the seeds' validation losses."""
        losses = [r.val_loss for r in self.runs]
        return (max(losses) - min(losses)) / 2.0


# ---------------------------------------------------------------------------------------------
# Text, as `nibble train` reads it

def default_corpus(directory: Path = FORTUNES) -> bytes:
    """The text `nibble train` trains on by default: the fortune files (not their .dat indexes, .u8
    links or hidden files) in name order, each ending in a newline."""
    if not directory.is_dir():
        raise SystemExit(f"the default corpus is read from {directory}, which does not exist; install the "
                         "`fortunes` package or pass --data FILE")
    text = b""
    for path in sorted(directory.iterdir(), key=lambda p: p.name):
        if path.name.startswith(".") or path.name.endswith((".dat", ".u8")) or path.is_symlink() or not path.is_file():
            continue
        text += path.read_bytes()
        if text and not text.endswith(b"\n"):
            text += b"\n"
    return text


def split_tokens(text: bytes, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train, validation, vocabulary size) as nibble's tokenizer and split make them: token i is the
    i-th smallest distinct byte; the last round(n * val_fraction) tokens are for validation."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    vocabulary = torch.unique(data)
    ids = torch.full((256,), -1, dtype=torch.long)
    ids[vocabulary] = torch.arange(len(vocabulary))
    tokens = ids[data]
    val = round(len(tokens) * val_fraction)
    return tokens[:len(tokens) - val], tokens[len(tokens) - val:], len(vocabulary)


def windows(data: torch.Tensor, batch: int, context: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch: `batch` random windows of context + 1 tokens."""
    starts = torch.randint(len(data) - context, (batch,), generator=gen)
    x = torch.stack([data[s:s + context] for s in starts])
    y = torch.stack([data[s + 1:s + 1 + context] for s in starts])
    return x, y


# ---------------------------------------------------------------------------------------------
# The two engines

def nanogpt_lr(step: int, r: Recipe) -> float:
    """nanoGPT's get_lr: linear warm-up to lr over warmup + 1 steps, cosine to min_lr at the last step."""
    if step < r.warmup:
        return r.lr * (step + 1) / (r.warmup + 1)
    if step > r.steps:
        return r.min_lr
    ratio = (step - r.warmup) / max(1, r.steps - r.warmup)
    return r.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (r.lr - r.min_lr)


def percentiles(step_ms: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(step_ms, n=10, method="inclusive") if len(step_ms) > 1 else step_ms * 9
    return statistics.median(step_ms), q[0], q[-1]


def run_torch(r: Recipe, text: bytes, seed: int, bias: bool, load: str) -> Run:
    """nanoGPT's training loop on the Python package's GPT: AdamW (fused where PyTorch has it) with
    weight decay on the >= 2-D tensors only, clipping, the warm-up + cosine schedule, fp32."""
    train, val, vocab = split_tokens(text, r.val_fraction)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=r.layers, n_head=r.heads, n_embd=r.width, block_size=r.context, vocab_size=vocab,
                          bias=bias))
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": r.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:
        optimizer = torch.optim.AdamW(groups, lr=r.lr, betas=(r.beta1, r.beta2), fused=True)
        implementation = "AdamW(fused=True)"
    except (RuntimeError, ValueError):
        optimizer = torch.optim.AdamW(groups, lr=r.lr, betas=(r.beta1, r.beta2))
        implementation = "AdamW"
    gen = torch.Generator().manual_seed(seed)
    step_ms = []
    for step in range(r.steps):
        start = time.perf_counter()
        for g in optimizer.param_groups:
            g["lr"] = nanogpt_lr(step, r)
        x, y = windows(train, r.batch, r.context, gen)
        loss = model.loss(x, y)
        loss.backward()
        if r.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, r.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_ms.append((time.perf_counter() - start) * 1e3)
    model.eval()
    eval_gen = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        val_loss = statistics.fmean(model.loss(*windows(val, r.batch, r.context, eval_gen)).item()
                                    for _ in range(r.eval_batches))
    median, p10, p90 = percentiles(step_ms)
    detail = f"torch {torch.__version__}, {implementation}, {torch.get_num_threads()} threads" + \
        ("" if bias else ", no biases")
    return Run("torch", load, seed, r.steps, median, p10, p90, r.batch * r.context / (median / 1e3), val_loss, detail)


def run_nibble(r: Recipe, cli: Path, data: Path, seed: int, load: str, work: Path, nanogpt_model: bool) -> Run:
    """`nibble train` with the same recipe, at its defaults otherwise (no environment variables);
    with nanogpt_model, the engine's model options that make it nanoGPT's (no biases, exact GELU)."""
    log = work / f"nibble-{load}-{seed}.csv"
    command = [str(cli), "train", "--preset", "char", "--layers", str(r.layers), "--heads", str(r.heads),
               "--width", str(r.width), "--context", str(r.context), "--batch", str(r.batch), "--seq", str(r.context),
               "--steps", str(r.steps), "--optimizer", "adamw", "--lr", str(r.lr),
               "--min-lr-ratio", str(r.min_lr / r.lr), "--schedule", "cosine", "--warmup", str(r.warmup),
               "--beta1", str(r.beta1), "--beta2", str(r.beta2), "--weight-decay", str(r.weight_decay),
               "--grad-clip", str(r.grad_clip), "--dropout", "0", "--eval-every", "0",
               "--eval-batches", str(r.eval_batches), "--val-fraction", str(r.val_fraction), "--seed", str(seed),
               "--data", str(data), "--log-csv", str(log)] + (["--no-bias", "--gelu", "exact"] if nanogpt_model else [])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "OPENBLAS_"))}
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    step_ms = [float(row["ms"]) for row in rows]
    val = [float(row["val_loss"]) for row in rows if row.get("val_loss")]
    if len(step_ms) != r.steps or not val:
        raise RuntimeError(f"{log}: expected {r.steps} steps and a validation loss, found {len(step_ms)} steps")
    median, p10, p90 = percentiles(step_ms)
    return Run("nibble", load, seed, r.steps, median, p10, p90, r.batch * r.context / (median / 1e3), val[-1],
               f"{cli}" + (" --no-bias --gelu exact" if nanogpt_model else ""))


# ---------------------------------------------------------------------------------------------
# A competing process

@contextmanager
def busy_core() -> Iterator[int]:
    """A process spinning on the last core this process may use, for the duration of the block (and
    never longer than BUSY_LIMIT_S, even if this process is killed); yields the core."""
    core = max(os.sched_getaffinity(0))
    spin = f"import os, time\nos.sched_setaffinity(0, {{{core}}})\nend = time.time() + {BUSY_LIMIT_S}\n" \
           "while time.time() < end: pass\n"
    proc = subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"the busy process exited at once with {proc.returncode}")
        yield core
    finally:
        proc.kill()
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# Output

def format_table(summaries: Sequence[Summary]) -> str:
    lines = [f"{'engine':<8} {'load':<5} {'ms/step':>8} {'p10-p90':>13} {'tokens/s':>9}  val loss per seed"
             f"{'':<10} mean +- half-range"]
    for s in summaries:
        first = s.runs[0]
        per_seed = " ".join(f"{r.val_loss:.4f}" for r in s.runs)
        lines.append(f"{s.engine:<8} {s.load:<5} {s.step_ms:>8.2f} {first.step_ms_p10:>6.1f}-{first.step_ms_p90:<6.1f} "
                     f"{statistics.median(r.tokens_per_s for r in s.runs):>9,.0f}  {per_seed:<26} "
                     f"{s.val_mean:.4f} +- {s.val_spread:.4f}")
    return "\n".join(lines)


def comparisons(summaries: Sequence[Summary]) -> list[str]:
    by = {(s.engine, s.load): s for s in summaries}
    out = []
    for load in ("idle", "busy"):
        n, t = by.get(("nibble", load)), by.get(("torch", load))
        if n and t:
            out.append(f"{load}: nibble takes {n.step_ms / t.step_ms:.2f}x torch's ms/step; validation loss "
                       f"{n.val_mean - t.val_mean:+.4f} against torch (seeds' half-ranges {n.val_spread:.4f} and "
                       f"{t.val_spread:.4f})")
    for engine in ("nibble", "torch"):
        idle, busy = by.get((engine, "idle")), by.get((engine, "busy"))
        if idle and busy:
            out.append(f"{engine}: {busy.step_ms / idle.step_ms:.2f}x slower with a busy core")
    return out


def write_reports(args: argparse.Namespace, info: dict, runs: list[Run]) -> None:
    if args.json:
        args.json.write_text(json.dumps({"run": info, "runs": [asdict(r) for r in runs]}, indent=2) + "\n")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(runs[0]).keys()))
            writer.writeheader()
            writer.writerows(asdict(r) for r in runs)


# ---------------------------------------------------------------------------------------------
# Command line

def _positive(text: str) -> int:
    return _positive_int(text, "value")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    r = Recipe()
    parser = argparse.ArgumentParser(
        prog="python -m nibble.bench_engine",
        description="Trains one recipe with nibble's engine (`nibble train`) and with a PyTorch GPT that follows "
                    "nanoGPT's model and training loop: same shapes, text, AdamW settings, schedule and clipping. "
                    "Prints ms/step, tokens/s and the final validation loss of each over several seeds. The "
                    "defaults are nanoGPT's CPU recipe for its character-level model (4 layers, 4 heads, width 128, "
                    "context 64, batch 12, lr 1e-3 cosine to 1e-4 after 100 warm-up steps, beta2 0.99, weight "
                    "decay 0.1, clip 1, 2000 steps).")
    parser.add_argument("--nibble", type=Path, metavar="PATH",
                        help="the nibble command-line program (default: `nibble` on PATH, else build/nibble of the "
                             "source tree when the package runs from one, else ./build/nibble)")
    parser.add_argument("--data", type=Path, metavar="FILE",
                        help="text to train on (default: the fortunes corpus `nibble train` reads by default)")
    parser.add_argument("--steps", type=_positive, default=r.steps, metavar="N", help=f"steps per run (default {r.steps})")
    parser.add_argument("--seeds", type=_positive, default=3, metavar="N", help="runs per engine, seeds 1..N (default 3)")
    parser.add_argument("--layers", type=_positive, default=r.layers, metavar="N", help=f"(default {r.layers})")
    parser.add_argument("--heads", type=_positive, default=r.heads, metavar="N", help=f"(default {r.heads})")
    parser.add_argument("--width", type=_positive, default=r.width, metavar="N", help=f"(default {r.width})")
    parser.add_argument("--context", type=_positive, default=r.context, metavar="N", help=f"(default {r.context})")
    parser.add_argument("--batch", type=_positive, default=r.batch, metavar="N", help=f"(default {r.batch})")
    parser.add_argument("--lr", type=_positive_float, default=r.lr, metavar="X", help=f"peak learning rate (default {r.lr})")
    parser.add_argument("--min-lr", type=_positive_float, default=r.min_lr, metavar="X",
                        help=f"learning rate at the last step, the cosine's floor (default {r.min_lr})")
    parser.add_argument("--warmup", type=int, default=r.warmup, metavar="N", help=f"warm-up steps (default {r.warmup})")
    parser.add_argument("--eval-batches", type=_positive, default=r.eval_batches, metavar="N",
                        help=f"validation batches for the final loss, both engines (default {r.eval_batches})")
    parser.add_argument("--torch-bias", action="store_true",
                        help="give the PyTorch GPT biases, as GPT-2's model (--nibble-model gpt2) has; nanoGPT's "
                             "train.py trains without")
    parser.add_argument("--nibble-model", choices=("gpt2", "nanogpt"), default="nanogpt",
                        help="the engine's model: nanogpt (--no-bias --gelu exact, the PyTorch GPT's model, so "
                             "both engines train the same model) or gpt2 (`nibble train`'s default: biases, tanh "
                             "GELU) (default nanogpt)")
    parser.add_argument("--busy", action="store_true",
                        help="also repeat every run with a process spinning on one core (started and stopped here)")
    parser.add_argument("--engines", default="nibble,torch", metavar="LIST",
                        help="which engines to run, comma-separated: nibble, torch (default both)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every run as JSON")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="also write every run as CSV")
    return parser


def find_cli(given: Path | None) -> Path:
    if given is not None:
        if not given.is_file():
            raise SystemExit(f"--nibble {given}: no such file")
        return given
    on_path = shutil.which("nibble")
    if on_path:
        return Path(on_path)
    # The source tree's build when the package runs from it, else ./build of the directory it runs in
    # (the repository's root, for the package installed into its .venv).
    for built in (Path(__file__).resolve().parents[2] / "build" / "nibble", Path.cwd() / "build" / "nibble"):
        if built.is_file():
            return built
    raise SystemExit("cannot find the nibble program: put it on PATH or pass --nibble PATH")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ("nibble", "torch")]
    if unknown or not engines:
        parser.error(f"--engines: {args.engines!r} must name nibble and/or torch")
    if args.warmup < 0 or args.warmup > args.steps:
        parser.error(f"--warmup: {args.warmup} must be in 0..{args.steps} (the steps)")
    if args.width % args.heads != 0:
        parser.error(f"--width {args.width} is not a multiple of --heads {args.heads}")
    if args.min_lr > args.lr:
        parser.error(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    recipe = Recipe(layers=args.layers, heads=args.heads, width=args.width, context=args.context, batch=args.batch,
                    steps=args.steps, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup,
                    eval_batches=args.eval_batches)
    cli = find_cli(args.nibble) if "nibble" in engines else None
    text = args.data.read_bytes() if args.data else default_corpus()
    loads = ["idle", "busy"] if args.busy else ["idle"]
    info = {"machine": platform.processor() or platform.machine(), "cpus": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "recipe": asdict(recipe), "torch_bias": args.torch_bias,
            "nibble_model": args.nibble_model,
            "data": str(args.data or FORTUNES), "text_bytes": len(text)}
    print(f"nibble bench_engine | {info['cpus']} cpus | torch {torch.__version__} | {recipe.layers} layers, "
          f"{recipe.heads} heads, width {recipe.width}, context {recipe.context}, batch {recipe.batch}, "
          f"{recipe.steps} steps, {args.seeds} seeds | {len(text):,} bytes of text", flush=True)
    runs: list[Run] = []
    summaries: dict[tuple[str, str], Summary] = {}
    with tempfile.TemporaryDirectory(prefix="nibble-bench-engine-") as tmp:
        work = Path(tmp)
        data = args.data if args.data else work / "corpus.txt"
        if not args.data:
            data.write_bytes(text)
        total = len(loads) * len(engines) * args.seeds
        for load in loads:
            with busy_core() if load == "busy" else _nothing() as core:
                if core is not None:
                    print(f"a busy process spins on core {core}", file=sys.stderr, flush=True)
                for seed in range(1, args.seeds + 1):
                    for engine in engines:
                        print(f"[{len(runs) + 1}/{total}] {engine}, {load}, seed {seed} ...", file=sys.stderr,
                              flush=True)
                        run = (run_nibble(recipe, cli, data, seed, load, work, args.nibble_model == "nanogpt")
                               if engine == "nibble"
                               else run_torch(recipe, text, seed, args.torch_bias, load))
                        print(f"    {run.step_ms_median:.2f} ms/step, validation loss {run.val_loss:.4f}",
                              file=sys.stderr, flush=True)
                        runs.append(run)
                        summaries.setdefault((engine, load), Summary(engine, load)).runs.append(run)
    print()
    print(format_table(list(summaries.values())))
    for line in comparisons(list(summaries.values())):
        print(line)
    write_reports(args, info, runs)
    return 0


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    sys.exit(main())
