"""Load benchmark (issue #4): our streaming NF4 loader vs transformers + bitsandbytes, same files.

    python -m bench.load                          # Llama-2-7B shapes on the GPU, both sides
    python -m bench.load --tiny                   # the same code at test size (CPU: ours only)
    python -m bench.load --side ours --json f     # one side: what the parent runs per subprocess

Both sides load one random Llama-2-7B-shaped checkpoint (bench/checkpoint.py, written once and
reused) in NF4 with double quantization and bf16 compute, each in its own process, so that
torch.cuda.max_memory_allocated is that loader's own peak. Figures per side: load time, peak
allocated GPU memory during the load, memory allocated once loaded (the resident model), and
peak / resident; the goal for ours is peak <= 1.05 x resident. The page cache is warmed first
(every shard read once), so neither side pays for the disk and the other not.

train_step.py loads through load_ours / load_peer below, so both benchmarks load the same way.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.checkpoint import LLAMA2_7B, TINY, write_random_checkpoint

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_7B = "/tmp/llama2-7b-random"
CHECKPOINT_TINY = "/tmp/llama-tiny-random"
GOAL_PEAK_OVER_RESIDENT = 1.05
GiB = 2**30


# ----------------------------------------------------------------------------- the two loaders

def load_ours(path, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """llama.load.load_llama in NF4 (blocksize 64, double quantization), compute dtype `dtype`."""
    from llama.load import load_llama
    return load_llama(path, device, dtype, load_in_4bit=True)


def load_peer(path, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """transformers' LlamaForCausalLM with bitsandbytes NF4 + double quantization, `dtype` compute, SDPA."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    return LlamaForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype,
                                            attn_implementation="sdpa", device_map=str(device))


def measure_load(load, device: torch.device):
    """Run load() -> (model, figures): seconds, peak and resident allocated bytes (None on the CPU)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    model = load()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    figures = {"load_s": seconds, "peak_allocated": None, "peak_reserved": None, "resident_allocated": None,
               "tensor_bytes": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
               "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if cuda:
        figures.update(peak_allocated=torch.cuda.max_memory_allocated(device) - before,
                       peak_reserved=torch.cuda.max_memory_reserved(device),
                       resident_allocated=torch.cuda.memory_allocated(device) - before)
    return model, figures


# ----------------------------------------------------------------------------- shared bench plumbing

def pick_device(name: str) -> torch.device:
    """auto: the current GPU (as cuda:N, which every loader accepts) or the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def prepare_checkpoint(path, tiny: bool) -> Path:
    """Write the random checkpoint unless it is there, then read every file once (warm page cache)."""
    t0 = time.perf_counter()
    path = write_random_checkpoint(path, TINY if tiny else LLAMA2_7B)
    written = time.perf_counter() - t0
    t0 = time.perf_counter()
    nbytes = 0
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            while chunk := f.read(64 * 2**20):
                nbytes += len(chunk)
    print(f"checkpoint {path}: {size(nbytes)} of safetensors (ready in {written:.1f}s, "
          f"read once in {time.perf_counter() - t0:.1f}s to warm the page cache)", flush=True)
    return path


def run_side_subprocess(module: str, side: str, extra: list[str], env: dict | None = None) -> dict:
    """python -m <module> --side <side> --json <tmp> ...: the side's JSON, or {'error': ...}.
    env: the child's environment (None: this one's)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{side}.json"
        cmd = [sys.executable, "-m", module, "--side", side, "--json", str(out), *extra]
        print(f"\n=== {side}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, cwd=REPO, env=env)
        if proc.returncode != 0 or not out.is_file():
            return {"side": side, "error": f"exit status {proc.returncode} (see the output above)"}
        return json.loads(out.read_text())


def versions() -> dict:
    found = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes", "triton"):
        try:
            found[name] = __import__(name).__version__
        except Exception as e:       # not installed, or (bitsandbytes) no library for this machine
            found[name] = f"unavailable ({type(e).__name__})"
    found["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return found


def size(nbytes) -> str:
    """Bytes as GiB (MiB below 1 GiB, so that --tiny shows something)."""
    if nbytes is None:
        return "-"
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.2f} MiB"


def ratio(a, b, digits: int = 2) -> str:
    return "-" if a is None or b is None or not b else f"{a / b:.{digits}f}"


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
        Path(args.json).write_text(json.dumps(result, indent=2))
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": str(path), "tiny": args.tiny, "results": results}, indent=2))
    print(f"details: {out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
