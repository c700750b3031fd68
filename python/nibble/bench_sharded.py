# Sharded training benchmark: FSDP2 training of nibble.bench_torch's GPT at 1, 2 and 4 ranks with
# torch.optim.AdamW and nibble.AdamW at fp32 / 8-bit / 4-bit: tokens/s, per-rank optimizer-state
# bytes, per-rank peak memory, as a table plus JSON/CSV. `python -m nibble.bench_sharded --help`.
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from ._gpt import GPT, PRESETS
from .bench_torch import ADAMW_ARGS, PeakMemory, peak_memory_measure

OPTIMIZERS = ("torch", "nibble-fp32", "nibble-8bit", "nibble-4bit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m nibble.bench_sharded",
        description="FSDP2 (torch.distributed.fsdp.fully_shard, every block and the root) training of a small GPT "
                    "at several world sizes, each rank a process of its own (gloo on the CPU; NCCL on one GPU, world "
                    "size 1). Prints a table and writes every row to JSON and CSV.")
    parser.add_argument("--worlds", default="1,2,4", help="comma-separated world sizes (default 1,2,4)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        help="comma-separated subset of " + ", ".join(OPTIMIZERS) + " (torch: torch.optim.AdamW "
                             "foreach; nibble-P: nibble.AdamW(precision=P)); default all")
    parser.add_argument("--config", default="tiny", choices=sorted(PRESETS), help="GPT preset (default tiny)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank per step (default 4)")
    parser.add_argument("--seq", type=int, default=0, help="tokens per sequence (default 0: the preset's context)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (default 5)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cpu (gloo, any world size) or cuda (NCCL, world size 1 on one GPU)")
    parser.add_argument("--json", default="bench_sharded.json", help="JSON output path (default bench_sharded.json)")
    parser.add_argument("--csv", default="bench_sharded.csv", help="CSV output path (default bench_sharded.csv)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds one world size may take before its ranks are killed (default 600)")
    parser.add_argument("--worker", nargs=4, metavar=("RANK", "WORLD", "STORE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.worlds = [int(w) for w in args.worlds.split(",")]
    except ValueError:
        parser.error(f"--worlds must be comma-separated integers, got {args.worlds!r}")
    if any(w < 1 for w in args.worlds):
        parser.error(f"--worlds must be >= 1, got {args.worlds}")
    if args.device == "cuda" and args.worlds != [1]:
        parser.error(f"--device cuda runs world size 1 on one GPU, got --worlds {args.worlds}")
    args.optimizers = args.optimizers.split(",")
    bad = [o for o in args.optimizers if o not in OPTIMIZERS]
    if bad:
        parser.error(f"--optimizers: unknown {bad}; choose from {', '.join(OPTIMIZERS)}")
    for name in ("batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.seq < 0:
        parser.error(f"--warmup and --seq must be >= 0, got {args.warmup} and {args.seq}")
    return args


def _optimizer(name: str, params: list) -> torch.optim.Optimizer:
    if name == "torch":
        return torch.optim.AdamW(params, foreach=True, **ADAMW_ARGS)
    from . import AdamW
    return AdamW(params, precision=name.split("-")[1], **ADAMW_ARGS)


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """This rank's optimizer-state bytes: nibble asks its library; torch sums its local shards."""
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    total = 0
    for entry in optimizer.state.values():
        for t in entry.values():
            if isinstance(t, torch.Tensor):
                local = t.to_local() if hasattr(t, "to_local") else t
                total += local.numel() * local.element_size()
    return total


def _run(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    config = PRESETS[args.config]
    seq = args.seq or config.block_size
    torch.manual_seed(0)
    model = GPT(config).to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    memory = PeakMemory(device)
    optimizer = _optimizer(name, list(model.parameters()))
    gen = torch.Generator().manual_seed(1000 + dist.get_rank())
    tokens = torch.randint(0, config.vocab_size, (args.batch, seq + 1), generator=gen).to(device)
    losses = []
    start = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    seconds = time.perf_counter() - start
    world = dist.get_world_size()
    return {"optimizer": name, "world": world, "rank": dist.get_rank(), "config": args.config,
            "batch_per_rank": args.batch, "seq": seq, "steps": args.steps,
            "tokens_per_s": world * args.batch * seq * args.steps / seconds,
            "state_bytes": _state_bytes(optimizer), "peak_bytes": memory.peak_bytes(),
            "final_loss": losses[-1]}


def _worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    rank, world, store, out = int(args.worker[0]), int(args.worker[1]), args.worker[2], args.worker[3]
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=args.timeout))
    rows = []
    if device.type == "cuda":
        torch.cuda.set_device(device)
    for name in args.optimizers:
        try:
            row = _run(name, args, device)
        except Exception:  # one failed row, reported; the other optimizers still run
            row = {"optimizer": name, "world": world, "rank": rank, "error": traceback.format_exc()}
        rows.append(row)
        if rank == 0:
            what = row.get("error", "").strip().splitlines()[-1:] or [
                f"{row['tokens_per_s']:,.0f} tokens/s, state {row['state_bytes']:,} B/rank"]
            print(f"  world {world}, {name}: {what[0]}", flush=True)
    with open(out, "w") as f:
        json.dump(rows, f)
    # NOTE: every rank has written its rows and passed the barrier, so no collective is left in
    # flight; the process then ends without tearing the group down. torch's gloo teardown
    # (destroy_process_group, or the interpreter's exit) was seen to abort a rank now and then with
    # "terminate called without an active exception" after its rows were complete.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _launch(world: int, argv: list[str], timeout: float, folder: Path) -> list[dict]:
    """Starts `world` ranks of this module; kills them all if they outlive `timeout`."""
    # The ranks meet through a file store in a fresh folder: no port to pick, so no other process can
    # take it between the pick and the bind.
    store = str(Path(tempfile.mkdtemp(prefix=f"rendezvous-world{world}-", dir=folder)) / "store")
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)))
    outs = [folder / f"world{world}-rank{r}.json" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, "-m", "nibble.bench_sharded", *argv,
                               "--worker", str(r), str(world), store, str(outs[r])], env=env,
                              stdout=None if r == 0 else subprocess.DEVNULL)
             for r in range(world)]
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"world size {world} did not finish in {timeout:.0f} s") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    rows = []
    for r, (p, out) in enumerate(zip(procs, outs)):
        if p.returncode != 0 or not out.exists():
            raise RuntimeError(f"rank {r} of world size {world} exited with {p.returncode}")
        rows += json.loads(out.read_text())
    return rows


def _table(rows: list[dict], device: str) -> str:
    lines = [f"{'optimizer':<12} {'world':>5} {'tokens/s':>10} {'state B/rank (max)':>19} {'vs world 1':>10} "
             f"{'peak MiB/rank (max)':>20}"]
    ok = [r for r in rows if "tokens_per_s" in r]
    one = {r["optimizer"]: r["state_bytes"] for r in ok if r["world"] == 1}
    keys = sorted({(r["optimizer"], r["world"]) for r in rows}, key=lambda k: (OPTIMIZERS.index(k[0]), k[1]))
    for name, world in keys:
        mine = [r for r in ok if (r["optimizer"], r["world"]) == (name, world)]
        if not mine:
            bad = next(r for r in rows if (r["optimizer"], r["world"]) == (name, world))
            reason = bad.get("skipped") or bad.get("error", "").strip().splitlines()[-1]
            lines.append(f"{name:<12} {world:>5} {reason}")
            continue
        state = max(r["state_bytes"] for r in mine)
        ratio = f"{state / one[name]:.4f}" if one.get(name) else "-"
        lines.append(f"{name:<12} {world:>5} {mine[0]['tokens_per_s']:>10,.0f} {state:>19,} {ratio:>10} "
                     f"{max(r['peak_bytes'] for r in mine) / 2**20:>20.1f}")
    lines.append(f"peak memory: {peak_memory_measure(torch.device(device))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    config = PRESETS[args.config]
    print(f"FSDP2 {args.config} GPT ({config.describe()}), batch {args.batch}/rank, {args.steps} timed steps after "
          f"{args.warmup}, {args.device}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="nibble-bench-sharded-") as folder:
        for world in args.worlds:
            print(f"world size {world}: {', '.join(args.optimizers)}", flush=True)
            rows += _launch(world, argv, args.timeout, Path(folder))
    print(_table(rows, args.device))
    Path(args.json).write_text(json.dumps({"device": args.device, "torch": torch.__version__, "rows": rows}, indent=1))
    fields = ["optimizer", "world", "rank", "config", "batch_per_rank", "seq", "steps", "tokens_per_s", "state_bytes",
              "peak_bytes", "final_loss", "skipped", "error"]
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in fields})
    print(f"wrote {args.json} and {args.csv}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
