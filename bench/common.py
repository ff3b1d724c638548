"""What the benchmarks share: the checkpoints they read, the two loaders (ours and the peer's) and
their measurement, one side per subprocess, versions, and the formatting of sizes and ratios.
"""

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.random_model import LLAMA2_7B, TINY, write_random_checkpoint

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_7B = "/tmp/llama2-7b-random"
CHECKPOINT_TINY = "/tmp/llama-tiny-random"
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
