"""Batched generation benchmark (issue #16, item 3): greedy tokens/s at batch 1, 8 and 32 on real
text-to-SQL prompts, and the time `infer.py --eval` takes to score the 1,034 Spider dev rows.

    python -m bench.batched_eval --rows ROWS.jsonl --tokenizer llama2-tokenizer.model --json out.json
    python -m bench.batched_eval --tiny --rows ../shared/data/spider_dev.jsonl --tokenizer ...   # CPU smoke

On the device, ../shared is not carried: copy spider_dev.jsonl and the Llama 2 tokenizer into a carried
folder first (bench/run_gpu.sh's `eval` stage does). The model is the random Llama-2-7B-shaped NF4
checkpoint of bench/random_model.py: its answers are noise and rarely hit EOS, so every row runs to
--new_tokens; the times are an upper bound for a trained model, which stops at EOS.
Prompts are the rows in the context_qa format, batched in order of length as infer.py does.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.random_model import LLAMA2_7B, TINY, write_random_checkpoint
from bench.common import CHECKPOINT_7B, load_ours
from llama.generate import generate
from llama.tokenizer import Tokenizer
from qlora.data import format_row, load_rows
from qlora.trainer import pick_device

REPO = Path(__file__).resolve().parents[1]


def tokens_per_second(model, prompts: list[list[int]], batch: int, new_tokens: int, cuda_graph: bool) -> dict:
    """Generate new_tokens for every prompt, `batch` prompts at a time (sorted by length): new tokens / s."""
    prompts = sorted(prompts, key=len)
    device = model.model.embed_tokens.weight.device
    generate(model, prompts[:batch], 4, cuda_graph=cuda_graph)                   # warm-up (graphs, autotune)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, made = time.perf_counter(), 0
    for start in range(0, len(prompts), batch):
        out = generate(model, prompts[start:start + batch], new_tokens, eos_id=None, cuda_graph=cuda_graph)
        made += sum(len(o) for o in out)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return {"batch": batch, "prompts": len(prompts), "new_tokens": made, "seconds": seconds,
            "tokens_per_s": made / seconds}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", required=True, help="JSONL rows {context, question, answer} (spider_dev.jsonl)")
    p.add_argument("--tokenizer", required=True, help="the Llama 2 tokenizer.model")
    p.add_argument("--tiny", action="store_true", help="test-size model (runs on the CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompts", type=int, default=64, help="prompts per batch-size measurement")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--eval_rows", type=int, default=0, help="rows scored by infer.py --eval (0: all)")
    p.add_argument("--json")
    args = p.parse_args(argv)

    device = pick_device(args.device)
    # --tiny keeps Llama 2's vocabulary, so the real tokenizer's ids fit.
    path = write_random_checkpoint("/tmp/llama-tiny-32k" if args.tiny else CHECKPOINT_7B,
                                   dict(TINY, vocab_size=32000) if args.tiny else LLAMA2_7B)
    tokenizer = Tokenizer(args.tokenizer)
    rows = load_rows(args.rows)
    prompts = [tokenizer.encode(format_row(r, "context_qa")[0]) for r in rows]
    lengths = sorted(len(q) for q in prompts)
    pct = {f"p{q}": lengths[min(len(lengths) - 1, len(lengths) * q // 100)] for q in (10, 50, 90)}
    print(f"{len(rows)} rows, prompt tokens {pct}, mean {sum(lengths) / len(lengths):.0f}")

    model = load_ours(path, device).eval()
    graph = device.type == "cuda"
    results = [tokens_per_second(model, prompts[:args.prompts], int(b), args.new_tokens, graph)
               for b in args.batches.split(",")]
    del model
    print("\n| batch | prompts | new tokens | s | tokens/s | x batch 1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['batch']} | {r['prompts']} | {r['new_tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_s'] / results[0]['tokens_per_s']:.2f} |")

    # infer.py --eval itself, as a user runs it: load, generate in batches of 32, score with sqlite3.
    cmd = [sys.executable, str(REPO / "infer.py"), "--base", str(path), "--tokenizer", args.tokenizer,
           "--eval", args.rows, "--batch_size", "32", "--max_new_tokens", str(args.new_tokens),
           "--eval_limit", str(args.eval_rows), "--device", str(device)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    eval_seconds = time.perf_counter() - t0
    print(f"\ninfer.py --eval ({args.eval_rows or len(rows)} rows, batch 32, {args.new_tokens} new tokens): "
          f"{eval_seconds:.1f} s, exit {done.returncode}")
    print("\n".join(done.stderr.strip().splitlines()[-3:]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": str(device), "prompt_tokens": pct, "results": results,
                                               "eval_seconds": eval_seconds, "eval_exit": done.returncode,
                                               "eval_stdout": done.stdout[-4000:]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
