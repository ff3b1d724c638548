"""What the benchmarks share: the checkpoints they read, the two loaders (ours and the peer's) and
their measurement, one side per subprocess, versions, and the formatting of sizes and ratios.
"""

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.random_model import LLAMA2_7B, TINY, write_random_checkpoint
from llama.model import Llama

REPO = Path(__file__).resolve().parents[1]
# The peers' target_modules for "every linear layer": our Llama's names, which are transformers'.
LINEAR = list(Llama.LINEAR_NAMES)
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


def prepare_checkpoint(path, tiny: bool, shape: dict | None = None) -> Path:
    """Write the random checkpoint (Llama-2-7B shapes, TINY if tiny, or `shape`) unless it is there,
    then read every file once (warm page cache)."""
    t0 = time.perf_counter()
    path = write_random_checkpoint(path, shape or (TINY if tiny else LLAMA2_7B))
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


def run_side_subprocess(module: str, side: str, extra: list[str], env: dict | None = None,
                        timeout: float | None = None) -> dict:
    """python -m <module> --side <side> --json <tmp> ...: the side's JSON, or {'error': ...} (with what
    the child had written to its JSON by then, if anything). env: the child's environment (None: this
    one's); timeout: seconds before the child is killed (None: no limit)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{side}.json"
        cmd = [sys.executable, "-m", module, "--side", side, "--json", str(out), *extra]
        print(f"\n=== {side}: {' '.join(cmd[1:])}", flush=True)
        try:
            error = None
            returncode = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            error = f"killed after its {timeout:.0f} s limit"
        if error is None and returncode == 0 and out.is_file():
            return json.loads(out.read_text())
        partial = json.loads(out.read_text()) if out.is_file() else {"side": side}
        return {**partial, "error": error or f"exit status {returncode} (see the output above)"}


def time_steps(step, batch, warmup: int, timed: int, device: torch.device, label: str,
               before_step=None) -> dict:
    """Run step(*batch) warmup + timed times -> losses, step times and host launch times (all steps) and
    the medians of the timed ones. step() ends in a host sync (a .item()) and sets step.enqueued, the
    perf_counter() when backward() had returned; before_step(), if given, runs before each step."""
    cuda = device.type == "cuda"
    losses, times, host = [], [], []
    for i in range(warmup + timed):
        if before_step is not None:
            before_step()
        t0 = time.perf_counter()
        losses.append(step(*batch))
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        host.append(step.enqueued - t0)
        print(f"{label}: step {i + 1} loss {losses[-1]:.4f} {times[-1]:.3f}s"
              f"{' (warm-up)' if i < warmup else ''}", flush=True)
    # Host time until backward() returned (all forward and backward kernels launched); close to
    # the step time means the GPU waited on Python, not the other way round.
    return dict(losses=losses, step_times_s=times, median_step_s=statistics.median(times[warmup:]),
                host_enqueue_s=host, median_host_enqueue_s=statistics.median(host[warmup:]))


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
