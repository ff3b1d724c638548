"""Issue #18's GPU check: train.py under torchrun --nproc_per_node 1 (NCCL, DDP) runs as fast as train.py alone.

    python -m bench.ddp_one_gpu              # Llama-2-7B shapes (random weights) on the GPU, ~4-5 min
    python -m bench.ddp_one_gpu --tiny       # the same code on the CPU (gloo), a tiny checkpoint, ~1 min
    python -m bench.ddp_one_gpu --json out/bench/ddp_one_gpu.json

Both sides run train.py itself, with the seed's configs/sql.yml (NF4, LoRA r=32 on every linear
layer, micro-batch 2 padded to 2048 tokens, gradient checkpointing, paged AdamW) on the built-in
SQL rows: first `python train.py`, then `python -m torch.distributed.run --standalone
--nproc_per_node 1 train.py`, which adds the process group, the DDP wrapper (a summed all-reduce of
the LoRA gradients), the all_reduce of each step's label count and loss, the rank-sharded data
stream and the barriers (both sides with OMP_NUM_THREADS=1, torchrun's default). tokens/s: the
median over the steps after the first two (warm-up: Triton compiles, the optimizer allocates) and
before the last (which also evaluates and saves), read from each run's metrics.jsonl. The tokenizer
is trained on the rows (512 ids): the model's speed does not depend on which ids it reads, and every
micro-batch is padded to the same length anyway.
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
from qlora.atomic import write_text

# torchrun gives its worker OMP_NUM_THREADS=1; the single run gets the same, so that only the
# distributed path differs (it matters on the CPU of --tiny; on the GPU the step hardly uses threads).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def sides(checkpoint: Path, tokenizer: Path, work: Path, tiny: bool, steps: int) -> dict[str, list[str]]:
    """The two command lines: train.py alone, and under torchrun with one process."""
    train = [str(REPO / "train.py"), "--config", str(REPO / "configs" / "sql.yml"), "--base_model", str(checkpoint),
             "--tokenizer", str(tokenizer), "--datasets", "builtin:sql", "--max_steps", str(steps),
             "--gradient_accumulation_steps", "1", "--warmup_steps", "2", "--eval_steps", "1000",
             "--save_steps", "1000", "--logging_steps", "1", "--dataset_prepared_path", "",
             "--eval_table_size", "0"]   # no generation: the 512-piece tokenizer cannot decode a 32000-vocab model's ids
    if tiny:                                            # the CPU: shorter rows, fp32
        train += ["--sequence_len", "256"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    return {"single": [sys.executable, *train, "--output_dir", str(work / "single")],
            "torchrun_1": [*torchrun, *train, "--output_dir", str(work / "torchrun_1")]}


def tokens_per_s(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r["tokens_per_s"] for r in rows[2:-1]]
    if not timed:
        raise ValueError(f"{out}/metrics.jsonl has {len(rows)} steps: run more (--steps)")
    return statistics.median(timed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny checkpoint on the CPU (gloo): the smoke test")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per side")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU: run with --tiny for the CPU smoke test")

    from llama.tokenizer import train_tokenizer
    from qlora.prompts import format_row
    from qlora.sql_dataset import sql_rows

    checkpoint = prepare_checkpoint(CHECKPOINT_TINY if args.tiny else CHECKPOINT_7B, args.tiny)
    result = {"versions": versions(), "steps": args.steps, "checkpoint": str(checkpoint)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer = train_tokenizer(["".join(format_row(r, "context_qa")) for r in sql_rows()], 512,
                                    work / "tokenizer.model")
        for side, cmd in sides(checkpoint, tokenizer, work, args.tiny, args.steps).items():
            print(f"\n=== {side}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV)
            wall = time.perf_counter() - t0
            print("\n".join(line for line in done.stdout.splitlines() if line.startswith(("step", "2 ranks", "base"))))
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"error: {side} failed with status {done.returncode}")
            result[side] = {"tokens_per_s": tokens_per_s(work / side), "wall_s": round(wall, 1)}
    single, one = result["single"]["tokens_per_s"], result["torchrun_1"]["tokens_per_s"]
    result["ratio"] = one / single
    print(f"\n{'side':<12} {'tokens/s':>10} {'wall s':>8}")
    for side in ("single", "torchrun_1"):
        print(f"{side:<12} {result[side]['tokens_per_s']:>10.0f} {result[side]['wall_s']:>8.1f}")
    print(f"torchrun --nproc_per_node 1 / single: {result['ratio']:.3f} (issue #18: within noise, ~1.00)")
    if args.json:
        write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
