"""Longest trainable context (issue #17): micro-batch 1, the longest sequence for which one training
step (forward, backward, optimizer) runs without running out of GPU memory, per side and model shape.

    python -m bench.long_context --shape llama2-7b       # ours:offload+shared, ours:shared, peer, unsloth:offload
    python -m bench.long_context --shape llama3-8b --sides ours:offload+shared,ours
    python -m bench.long_context --tiny --cap-tokens 3000   # the search on the CPU (a pretend limit)

Each side runs in its own process (bench/train_step.py's builders, the same settings: NF4 + double
quant, bf16, LoRA r 32 alpha 16 dropout 0.05 on all linears, paged AdamW) and searches: doubling from
--start tokens until a step runs out of memory, then bisecting between the longest that ran and the
shortest that did not, to --granularity tokens or until its --time-cap (seconds) is spent. A length
that ran out of memory after one that fitted is tried in the same process, after freeing what the
failed step held (empty_cache): fragmentation can only make a side look shorter, not longer. No length
beyond --max-tokens (1M) is tried: Unsloth is loaded with max_seq_length = --max-tokens, because it
truncates longer inputs and plans its own offloading (embeddings, layer swaps) for that length.

Attention. A causal step at 300k tokens spends minutes in attention (its FLOPs grow with T^2) while its
memory grows with T (flash-style kernels keep no T x T matrix). So, with --attention stand-in (the
default), torch's scaled_dot_product_attention is replaced in every side by LinearTimeAttention: the
same output, the same saved tensors (q, k, v, out, an fp32 logsumexp) and an fp32 gradient accumulator
of q's size in backward, as PyTorch's flash backward allocates, in linear time. The numbers it computes
are not attention's; the memory is. Each side first runs one step at --check tokens with the real
kernel and with the stand-in, and reports both peaks, so the stand-in's fidelity is measured where the
real one is cheap. --attention real searches with the real kernel (slow beyond ~64k tokens).

The lead's GPU call per shape (about 5 minutes each; carry .bnb, .whl/unsloth, .gpu-data):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-unsloth .whl/unsloth/*.whl
    PYTHONPATH=$PWD/.bnb HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 python -m bench.long_context \\
        --shape llama2-7b --unsloth-path /tmp/site-unsloth --json $OUT/long_context_llama2.json
"""

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import REPO, prepare_checkpoint, run_side_subprocess, size, versions
from qlora.checkpointing import PINNED_POOL
from bench.random_model import LLAMA2_7B, LLAMA3_8B, TINY
from qlora.atomic import write_text
from qlora.trainer import pick_device

SHAPES = {"llama2-7b": (LLAMA2_7B, "/tmp/llama2-7b-random"), "llama3-8b": (LLAMA3_8B, "/tmp/llama3-8b-random"),
          "tiny": (TINY, "/tmp/llama-tiny-random")}
DEFAULT_SIDES = "ours:offload+shared,ours:shared,peer,unsloth:offload"


# ----------------------------------------------------------------------------- the stand-in attention

class LinearTimeAttention(torch.autograd.Function):
    """What SDPA's flash kernel holds, in linear time: output q's shape and dtype; saved q, k, v, out
    and an fp32 (B, H, T) logsumexp; backward allocates an fp32 accumulator of q's shape (FlashAttention
    2's dq_accum) and returns dq, dk, dv. Not attention's values: a memory probe only."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.clone()                                                          # (B, H, T, hd)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)    # (B, H, T)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq_accum = grad_out.float()                                              # (B, H, T, hd) fp32
        return dq_accum.to(q.dtype), torch.zeros_like(k), torch.zeros_like(v)


def stand_in_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return LinearTimeAttention.apply(query, key, value)


class Attention:
    """Which scaled_dot_product_attention torch.nn.functional hands out: "real" or "stand-in"."""
    real = F.scaled_dot_product_attention

    @classmethod
    def use(cls, kind: str) -> None:
        F.scaled_dot_product_attention = cls.real if kind == "real" else stand_in_sdpa


# ----------------------------------------------------------------------------- one side: the search

def host_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def offload_bytes(shape: dict, T: int) -> int:
    """Host memory offloaded checkpoints take at micro-batch 1 x T: every block's bf16 input but the last."""
    return (shape["num_hidden_layers"] - 1) * T * shape["hidden_size"] * 2


def fits(step, vocab_size: int, T: int, device, cap_tokens: int | None,
         host_needed: int = 0) -> tuple[bool, int | None]:
    """One step at micro-batch 1 x T -> (ran without running out of memory, its peak allocated bytes).
    host_needed: pinned host bytes the side's offloaded checkpoints take at T; a length that needs more
    than 80% of the host's available memory counts as not fitting, untried (pinning all of a machine's
    RAM can take the machine down, not just the step)."""
    if cap_tokens is not None and T > cap_tokens:          # the CPU smoke test's pretend limit
        return False, None
    available = host_available()
    if available is not None:             # the offload pool's free buffers are unpinned before new ones
        available += PINNED_POOL.free_bytes()
    if host_needed and available and host_needed > 0.8 * available:
        print(f"  {T:,d} tokens need {size(host_needed)} of pinned host memory, {size(available)} available: "
              "counted as not fitting (host memory)", flush=True)
        return False, None
    ids = torch.randint(0, vocab_size, (1, T), generator=torch.Generator().manual_seed(T)).to(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step(ids, ids)
        ok = True
    except torch.OutOfMemoryError:
        ok = False
    step.optimizer.zero_grad(set_to_none=True)             # what a failed backward left behind
    del ids
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.empty_cache()
        return ok, peak
    return ok, None


def search(try_length, start: int, granularity: int, time_cap: float, limit: int | None = None) -> dict:
    """Doubling from `start` until a length fails, then bisecting (to multiples of granularity) between
    the longest that ran and the shortest that did not, until they are one granularity apart or the
    time cap is spent; never beyond `limit` tokens -> {"longest", "shortest_failed", "tries", ...}."""
    t0 = time.perf_counter()
    longest, failed, tries = 0, None, []
    T = start if limit is None else min(start, limit)
    while T and time.perf_counter() - t0 < time_cap:
        t = time.perf_counter()
        ok, peak = try_length(T)
        tries.append(dict(tokens=T, fits=ok, peak_allocated=peak, seconds=time.perf_counter() - t))
        print(f"  {T:,d} tokens: {'ran' if ok else 'out of memory'} in {tries[-1]['seconds']:.1f}s"
              f"{f', peak {size(peak)}' if peak else ''}", flush=True)
        if ok:
            longest = T
        else:
            failed = T
        if failed is None:
            if limit is not None and T >= limit:
                break                                      # fits at the limit: the search ends there
            T = 2 * T if limit is None else min(2 * T, limit)
            continue
        if failed - longest <= granularity:
            break
        T = (longest + failed) // 2 // granularity * granularity
        if T <= longest:
            T = longest + granularity
    return dict(longest=longest, shortest_failed=failed, tries=tries, seconds=time.perf_counter() - t0,
                bracket_closed=failed is not None and failed - longest <= granularity,
                reached_limit=limit is not None and longest >= limit)


def run_side(spec: str, args, device) -> dict:
    from bench import train_step

    name, levers = train_step.parse_side(spec)
    shape, checkpoint = SHAPES[args.shape]
    # seq_len is what Unsloth is loaded for (its max_seq_length: it truncates longer inputs, and plans
    # its own offloading for that length); the search stays at or below it.
    s = train_step.Settings(checkpoint=args.checkpoint or checkpoint, micro_batch=1, seq_len=args.max_tokens,
                            tokenizer=args.tokenizer)
    builders = {"ours": lambda: train_step.build_ours(s, device, levers),
                "peer": lambda: train_step.build_peer(s, device),
                "unsloth": lambda: train_step.build_unsloth(s, device, levers)}
    _, step, info = builders[name]()
    vocab = shape["vocab_size"]
    result = dict(side=spec, shape=args.shape, device=str(device), versions=versions(), attention=args.attention,
                  gradient_checkpointing=info.get("gradient_checkpointing"), load=info["load"])
    if device.type == "cuda":
        result["free_at_start"], result["total"] = torch.cuda.mem_get_info(device)
    if args.check:                       # the stand-in's fidelity where the real kernel is cheap
        checks = {}
        for kind in ("real", "stand-in"):
            Attention.use(kind)
            ok, peak = fits(step, vocab, args.check, device, args.cap_tokens)
            checks[kind] = dict(fits=ok, peak_allocated=peak)
            print(f"{spec}: check at {args.check:,d} tokens, {kind} attention: "
                  f"{'ran' if ok else 'out of memory'}{f', peak {size(peak)}' if peak else ''}", flush=True)
        result["check"] = dict(tokens=args.check, **checks)
    Attention.use(args.attention)
    print(f"{spec}: searching from {args.start:,d} tokens ({args.attention} attention, cap {args.time_cap:.0f}s)",
          flush=True)
    offloads = "offload" in levers
    result["host_available_at_start"] = host_available()
    result.update(search(lambda T: fits(step, vocab, T, device, args.cap_tokens,
                                        offload_bytes(shape, T) if offloads else 0),
                         args.start, args.granularity, args.time_cap, args.max_tokens))
    return result


# ----------------------------------------------------------------------------- the parent

def print_table(results: dict, shape: str) -> None:
    print(f"\n## Longest trainable context, {shape} shapes, micro-batch 1\n")
    print("| side | longest that ran | shortest out of memory | bracket | tries | search time | peak at the "
          "longest | check: real / stand-in peak |")
    print("|" + " --- |" * 8)
    for spec, r in results.items():
        if "longest" not in r:
            print(f"| {spec} | {r.get('error') or r.get('skipped', '-')} |" + " |" * 6)
            continue
        at_longest = next((t["peak_allocated"] for t in r["tries"] if t["tokens"] == r["longest"]), None)
        check = r.get("check") or {}
        real, stand = (check.get(k, {}).get("peak_allocated") for k in ("real", "stand-in"))
        fidelity = f"{size(real)} / {size(stand)} at {check['tokens']:,d}" if real and stand else "-"
        failed = (f"{r['shortest_failed']:,d}" if r["shortest_failed"] else
                  "none: fits at --max-tokens" if r.get("reached_limit") else "none (time cap)")
        print(f"| {spec} | **{r['longest']:,d}** | {failed} | {'closed' if r['bracket_closed'] else 'open'} "
              f"| {len(r['tries'])} | {r['seconds']:.0f} s | {size(at_longest)} | {fidelity} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=[k for k in SHAPES if k != "tiny"], default="llama2-7b")
    parser.add_argument("--tiny", action="store_true", help="test-size model on the CPU (with --cap-tokens)")
    parser.add_argument("--checkpoint", help="checkpoint directory (default: /tmp/<shape>-random, written if missing)")
    parser.add_argument("--sides", default=DEFAULT_SIDES,
                        help=f"bench/train_step.py side specs (default {DEFAULT_SIDES})")
    parser.add_argument("--start", type=int, default=16384, help="first length tried (tokens)")
    parser.add_argument("--granularity", type=int, default=8192, help="stop bisecting at this bracket (tokens)")
    parser.add_argument("--time-cap", type=float, default=60.0, help="seconds of searching per side")
    parser.add_argument("--max-tokens", type=int, default=1 << 20,
                        help="longest length tried; Unsloth is loaded with this max_seq_length (default 1M)")
    parser.add_argument("--check", type=int, default=8192, help="tokens of the real-vs-stand-in check (0: none)")
    parser.add_argument("--attention", choices=["stand-in", "real"], default="stand-in")
    parser.add_argument("--cap-tokens", type=int, help="pretend lengths above this run out of memory (CPU smoke test)")
    parser.add_argument("--unsloth-path", default="", help="Unsloth installed with pip --target (PEERS.md)")
    parser.add_argument("--tokenizer", default="", help="tokenizer.model for Unsloth (bench/train_step.py)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the results here (default out/bench/long_context_<shape>.json)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.shape = "tiny"
        if args.start == 16384:
            args.start, args.granularity, args.check, args.max_tokens = 256, 256, 128, 8192
    from bench import train_step
    sides = [args.side] if args.side else args.sides.split(",")
    for spec in sides:
        train_step.parse_side(spec)
    device = pick_device(args.device)
    if device.type != "cuda" and args.cap_tokens is None:
        raise SystemExit("error: on the CPU nothing runs out of memory: pass --cap-tokens N (a pretend limit)")

    if args.side:
        write_text(args.json, json.dumps(run_side(args.side, args, device), indent=2))
        return 0

    shape, checkpoint = SHAPES[args.shape]
    args.checkpoint = args.checkpoint or checkpoint
    prepare_checkpoint(args.checkpoint, args.tiny, shape)
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
             if k in ("checkpoint", "start", "granularity", "time_cap", "max_tokens", "check", "attention",
                      "cap_tokens", "tokenizer", "device") and v not in (None, "")] + (["--tiny"] if args.tiny else [])
    if not args.tiny:
        extra.append(f"--shape={args.shape}")
    out = Path(args.json or REPO / f"out/bench/long_context_{args.shape}.json")
    results = {}
    for spec in sides:
        name = spec.split(":")[0]
        if name != "ours" and device.type != "cuda":
            results[spec] = {"side": spec, "skipped": "no CUDA device (the peers' CUDA paths are compared)"}
            continue
        env = None
        if name == "unsloth" and args.unsloth_path:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (args.unsloth_path,
                                                                          os.environ.get("PYTHONPATH")) if p))
        # The child's own cap plus its load and the check: a side that hangs cannot eat the others' time.
        results[spec] = run_side_subprocess("bench.long_context", spec, extra, env=env, timeout=args.time_cap + 150)
        # After every side: a device call cut short at its limit keeps the sides that finished.
        write_text(out, json.dumps({"shape": args.shape, "config": shape, "results": results}, indent=2))
    print_table(results, args.shape)
    print(f"details: {out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
