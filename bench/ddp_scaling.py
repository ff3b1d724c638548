"""train.py under torchrun against train.py alone: issue #18's one-GPU check and issue #19's scaling.

    python -m bench.ddp_scaling                  # torchrun --nproc_per_node 1 vs alone, 7B shapes, ~4-5 min
    python -m bench.ddp_scaling --nproc 2        # DDP and FSDP2 on 2 GPUs vs one (issue #19), ~8 min
    python -m bench.ddp_scaling --shape 70b --nproc 2   # Llama-2-70B shapes: one GPU vs FSDP2 on 2 (issue #19)
    python -m bench.ddp_scaling --tiny [--nproc 2] [--shape 70b]   # the same code on the CPU (gloo), tiny models
    python -m bench.ddp_scaling --json out/bench/ddp_scaling.json

Every side runs train.py itself, with the seed's configs/sql.yml (NF4, LoRA r=32 on every linear
layer, micro-batch 2 padded to 2048 tokens, gradient checkpointing, paged AdamW) on the built-in
SQL rows: first `python train.py`, then `python -m torch.distributed.run --standalone
--nproc_per_node N train.py` (with N = 1: the process group, the DDP wrapper, the all_reduce of each
step's label count and loss, the rank-sharded data stream and the barriers, all on one GPU; with
N > 1: DDP, then FSDP2 with `--distributed fsdp`). All sides with OMP_NUM_THREADS=1, torchrun's
default. tokens/s: useful tokens of all ranks together (train.py's metrics.jsonl), the median over
the steps after the first two (warm-up: Triton compiles, the optimizer allocates) and before the
last (which also evaluates and saves); with N ranks a step holds N micro-batches, so the ratio to
the single process is the scaling. Memory: rank 0's peak (mem_gib) and the base-weight lines each
rank prints. The tokenizer is trained on the rows (512 ids): the model's speed does not depend on
which ids it reads, and every micro-batch is padded to the same length anyway.

--shape 70b: Llama-2-70B shapes, random weights written once in NF4 (bitsandbytes' format, ~37 GB:
the bf16 checkpoint would be 138 GB, more than the disk; bench/random_model.py), which train.py
loads as they are; micro-batch 1 x 2048 (issue 23's 70B setting) and sql.yml's r 32. Sides: one
process, then FSDP2 (DDP would hold the whole 70B on every GPU: no news there). The anchor for
memory per GPU is Answer.AI's 70B QLoRA on 2 x 24 GB GPUs with FSDP (14.9 GiB per GPU, their
settings, not these).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import CHECKPOINT_7B, CHECKPOINT_TINY, REPO, prepare_checkpoint, versions
from bench.random_model import LLAMA2_70B, TINY, write_prequantized_checkpoint
from qlora.atomic import write_text

# torchrun gives its worker OMP_NUM_THREADS=1; the single run gets the same, so that only the
# distributed path differs (it matters on the CPU of --tiny; on the GPU the step hardly uses threads).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CHECKPOINT_70B = "/tmp/llama2-70b-nf4"          # --shape 70b: written once in NF4 (write_prequantized_checkpoint)
CHECKPOINT_70B_TINY = "/tmp/llama-tiny-gqa-nf4"
TINY_GQA = dict(TINY, num_key_value_heads=2)     # --tiny --shape 70b: grouped-query attention, as 70B's


def sides(checkpoint: Path, tokenizer: Path, work: Path, tiny: bool, steps: int, nproc: int,
          shape: str = "7b") -> dict[str, list[str]]:
    """The command lines: train.py alone, then under torchrun with nproc processes (DDP, and FSDP2
    when nproc > 1; at 70b shapes FSDP2 only)."""
    train = [str(REPO / "train.py"), "--config", str(REPO / "configs" / "sql.yml"), "--base_model", str(checkpoint),
             "--tokenizer", str(tokenizer), "--datasets", "builtin:sql", "--max_steps", str(steps),
             "--gradient_accumulation_steps", "1", "--warmup_steps", "2", "--eval_steps", "1000",
             "--save_steps", "1000", "--logging_steps", "1", "--dataset_prepared_path", "",
             "--eval_table_size", "0"]   # no generation: the 512-piece tokenizer cannot decode a 32000-vocab model's ids
    if tiny:                                            # the CPU: shorter rows, fp32
        train += ["--sequence_len", "256"]
    if shape == "70b":
        train += ["--micro_batch_size", "1"]
    if nproc > 1:                                       # FSDP2 refuses fp16 (sql.yml's): all sides in bf16
        train += ["--fp16", "false", "--bf16", "true"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    commands = {"single": [sys.executable, *train, "--output_dir", str(work / "single")]}
    if shape != "70b":
        commands[f"ddp_{nproc}"] = [*torchrun, *train, "--output_dir", str(work / f"ddp_{nproc}")]
    if nproc > 1:
        commands[f"fsdp_{nproc}"] = [*torchrun, *train, "--distributed", "fsdp", "--output_dir", str(work / f"fsdp_{nproc}")]
    return commands


def figures(out: Path) -> tuple[float, float]:
    """(median tokens/s of the timed steps, rank 0's peak GiB) from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows[2:-1] if "tokens_per_s" in r]
    if not timed:
        raise ValueError(f"{out}/metrics.jsonl has {len(rows)} steps: run more (--steps)")
    return statistics.median(r["tokens_per_s"] for r in timed), max(r["mem_gib"] for r in timed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny checkpoint on the CPU (gloo): the smoke test")
    parser.add_argument("--nproc", type=int, default=1, help="processes under torchrun (GPUs; 1: issue #18's check)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per side")
    parser.add_argument("--shape", choices=("7b", "70b"), default="7b",
                        help="Llama-2-7B (a bf16 checkpoint) or Llama-2-70B shapes (written in NF4)")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    if not args.tiny and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"error: --nproc {args.nproc} needs {args.nproc} CUDA GPUs, this machine has "
                         f"{torch.cuda.device_count()}: fewer, or --tiny for the CPU smoke test")
    if args.nproc < 1:
        raise SystemExit("error: --nproc must be at least 1")
    if args.shape == "70b" and args.nproc < 2:
        raise SystemExit("error: --shape 70b compares one process with FSDP2: give --nproc 2 or more")

    from llama.tokenizer import train_tokenizer
    from qlora.prompts import format_row
    from qlora.sql_dataset import sql_rows

    if args.shape == "70b":
        t0 = time.perf_counter()
        checkpoint = write_prequantized_checkpoint(CHECKPOINT_70B_TINY if args.tiny else CHECKPOINT_70B,
                                                   TINY_GQA if args.tiny else LLAMA2_70B)
        print(f"checkpoint {checkpoint} (NF4) ready in {time.perf_counter() - t0:.1f}s", flush=True)
    else:
        checkpoint = prepare_checkpoint(CHECKPOINT_TINY if args.tiny else CHECKPOINT_7B, args.tiny)
    result = {"versions": versions(), "steps": args.steps, "nproc": args.nproc, "shape": args.shape,
              "checkpoint": str(checkpoint)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer = train_tokenizer(["".join(format_row(r, "context_qa")) for r in sql_rows()], 512,
                                    work / "tokenizer.model")
        commands = sides(checkpoint, tokenizer, work, args.tiny, args.steps, args.nproc, args.shape)
        for side, cmd in commands.items():
            print(f"\n=== {side}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV)
            wall = time.perf_counter() - t0
            printed = [line for line in done.stdout.splitlines()
                       if line.startswith(("step", "rank", "base")) or " ranks" in line[:12]]
            print("\n".join(printed))
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"error: {side} failed with status {done.returncode}")
            speed, peak = figures(work / side)
            result[side] = {"tokens_per_s": speed, "rank0_peak_gib": peak, "wall_s": round(wall, 1),
                            "rank_lines": [line for line in printed if line.startswith("rank")]}
    single = result["single"]["tokens_per_s"]
    print(f"\n{'side':<10} {'tokens/s':>10} {'/ single':>9} {'rank 0 peak':>12} {'wall s':>8}")
    for name in commands:
        r = result[name]
        r["ratio"] = r["tokens_per_s"] / single
        print(f"{name:<10} {r['tokens_per_s']:>10.0f} {r['ratio']:>8.3f}x {r['rank0_peak_gib']:>9.2f} GiB {r['wall_s']:>8.1f}")
    if args.shape == "70b":
        print(f"issue #19, 70B: fsdp_{args.nproc}'s peak per GPU against one GPU's, and against Answer.AI's "
              "14.9 GiB per GPU on 2 x 24 GB (their settings); base weights per rank in the rank lines")
    elif args.nproc == 1:
        print("issue #18: torchrun --nproc_per_node 1 within noise of one process (~1.00)")
    else:
        print(f"issue #19 goals: ddp_{args.nproc} >= 1.85x (2 GPUs), fsdp_{args.nproc} >= 1.6x with base "
              "weights per GPU <= 0.55x one GPU's (the rank lines)")
    if args.json:
        write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
