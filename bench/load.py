"""Load benchmark (issue #4): our streaming NF4 loader vs transformers + bitsandbytes, same files.

    python -m bench.load                          # Llama-2-7B shapes on the GPU, both sides
    python -m bench.load --tiny                   # the same code at test size (CPU: ours only)
    python -m bench.load --side ours --json f     # one side: what the parent runs per subprocess

Both sides load one random Llama-2-7B-shaped checkpoint (bench/random_model.py, written once and
reused) in NF4 with double quantization and bf16 compute, each in its own process, so that
torch.cuda.max_memory_allocated is that loader's own peak. Figures per side: load time, peak
allocated GPU memory during the load, memory allocated once loaded (the resident model), and
peak / resident; the goal for ours is peak <= 1.05 x resident. The page cache is warmed first
(every shard read once), so neither side pays for the disk and the other not.

train_step.py and decode.py load through bench/common.py's load_ours / load_peer too, so every
benchmark loads the same way.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from bench.common import (CHECKPOINT_7B, CHECKPOINT_TINY, REPO, load_ours, load_peer, measure_load, prepare_checkpoint,
                          ratio, run_side_subprocess, size, versions)
from qlora.atomic import write_text
from qlora.trainer import pick_device

GOAL_PEAK_OVER_RESIDENT = 1.05


# ----------------------------------------------------------------------------- one side

def run_side(side: str, path: str, device: torch.device) -> dict:
    # Import each side's libraries before the clock starts: the figure is the load, not the imports.
    if side == "ours":
        import llama.load  # noqa: F401
        model, figures = measure_load(lambda: load_ours(path, device), device)
    else:
        import bitsandbytes  # noqa: F401
        import transformers  # noqa: F401
        from transformers import LlamaForCausalLM  # noqa: F401  (transformers imports models lazily)
        model, figures = measure_load(lambda: load_peer(path, device), device)
    figures.update(side=side, device=str(device), versions=versions())
    if figures["resident_allocated"]:
        figures["peak_over_resident"] = figures["peak_allocated"] / figures["resident_allocated"]
    print(f"{side}: loaded in {figures['load_s']:.1f}s, peak {size(figures['peak_allocated'])}, "
          f"resident {size(figures['resident_allocated'])} allocated "
          f"({size(figures['tensor_bytes'])} in parameters and buffers)", flush=True)
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help=f"checkpoint directory (default {CHECKPOINT_7B}, "
                                             f"{CHECKPOINT_TINY} with --tiny); written if missing")
    parser.add_argument("--tiny", action="store_true", help="test-size model (runs on the CPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    parser.add_argument("--sides", default="ours,peer", help="comma-separated: ours, peer")
    parser.add_argument("--cpu-peer", action="store_true",
                        help="on the CPU, run the peer too (bitsandbytes' CPU backend; a smoke test only)")
    parser.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)   # a child process
    parser.add_argument("--json", help="write the results here (default out/bench/load.json)")
    args = parser.parse_args(argv)
    path = args.checkpoint or (CHECKPOINT_TINY if args.tiny else CHECKPOINT_7B)
    device = pick_device(args.device)

    if args.side:
        result = run_side(args.side, path, device)
        write_text(args.json, json.dumps(result, indent=2))
        return 0

    prepare_checkpoint(path, args.tiny)
    extra = ["--checkpoint", path, "--device", str(device)]
    results = {}
    for side in args.sides.split(","):
        if side == "peer" and device.type != "cuda" and not args.cpu_peer:
            print("\n=== peer: skipped on the CPU (bitsandbytes' CUDA path is the peer; --cpu-peer runs its "
                  "CPU backend as a smoke test)")
            results[side] = {"side": side, "skipped": "no CUDA device"}
            continue
        results[side] = run_side_subprocess("bench.load", side, extra)

    ours, peer = results.get("ours", {}), results.get("peer", {})
    rows = [("load time", "load_s", lambda v: f"{v:.2f} s"),
            ("peak allocated during load", "peak_allocated", size),
            ("resident after load (allocated)", "resident_allocated", size),
            ("parameters + buffers", "tensor_bytes", size),
            ("peak / resident", "peak_over_resident", lambda v: f"{v:.3f}")]
    print(f"\n## Load, {'tiny' if args.tiny else 'Llama-2-7B'}-shaped random checkpoint, NF4 + double quant, "
          f"bf16 ({versions()['device']})\n")
    print("| figure | ours | peer | ours / peer |\n| --- | --- | --- | --- |")
    for label, key, fmt in rows:
        a, b = ours.get(key), peer.get(key)
        print(f"| {label} | {'-' if a is None else fmt(a)} | {'-' if b is None else fmt(b)} | {ratio(a, b)} |")
    for side, result in results.items():
        if "error" in result or "skipped" in result:
            print(f"\n{side}: {result.get('error') or 'skipped: ' + result['skipped']}")
    if ours.get("peak_over_resident") is not None:
        met = ours["peak_over_resident"] <= GOAL_PEAK_OVER_RESIDENT
        print(f"\ngoal peak <= {GOAL_PEAK_OVER_RESIDENT} x resident: {'met' if met else 'NOT met'} "
              f"({ours['peak_over_resident']:.3f})")
    out = Path(args.json or REPO / "out/bench/load.json")
    write_text(out, json.dumps({"checkpoint": str(path), "tiny": args.tiny, "results": results}, indent=2))
    print(f"details: {out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
