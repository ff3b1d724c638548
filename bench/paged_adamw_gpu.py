"""GPU check of qlora.paged_adamw.PagedAdamW against torch.optim.AdamW and bitsandbytes.

    PYTHONPATH=.bnb python bench/paged_adamw_gpu.py

Four optimizers each train their own copy of the same ~100M fp32 parameters (4 tensors) for 20
steps on the same gradients: ours paged (state in CUDA managed memory), ours with paged=False,
torch.optim.AdamW (foreach), and bitsandbytes' PagedAdamW32bit when it can be imported. It prints
the largest parameter difference from torch after 20 steps, whether the state is managed memory
(cudaPointerGetAttributes), and the median time per step over the last 15 steps.
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qlora.paged_adamw import PagedAdamW, _cudart, is_managed  # noqa: E402

SHAPES = [(5120, 5120)] * 4          # 4 x 26.2M = 104.9M parameters
STEPS, WARMUP = 20, 5
LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 0.01

if not torch.cuda.is_available():
    sys.exit("needs a CUDA GPU")
device = torch.device("cuda")
n_params = sum(a * b for a, b in SHAPES)
free_before, total = torch.cuda.mem_get_info()
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA runtime {_cudart()[1]}; "
      f"{n_params / 1e6:.1f}M parameters; free {free_before / 2**30:.1f} of {total / 2**30:.1f} GiB")

torch.manual_seed(0)
start = [torch.randn(shape, device=device) * 0.02 for shape in SHAPES]


def make(name):
    params = [torch.nn.Parameter(w.clone()) for w in start]
    if name == "ours, paged":
        return params, PagedAdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    if name == "ours, paged=False":
        return params, PagedAdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, paged=False)
    if name == "torch.optim.AdamW":
        return params, torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    import bitsandbytes as bnb
    return params, bnb.optim.PagedAdamW32bit(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)


names = ["torch.optim.AdamW", "ours, paged", "ours, paged=False", "bnb PagedAdamW32bit"]
runs = {}
for name in names:
    try:
        params, optimizer = make(name)
    except ImportError as e:
        print(f"skipping {name}: {e}")
        continue
    generator = torch.Generator(device=device).manual_seed(1)  # the same gradients for everyone
    times = []
    for step in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, device=device, generator=generator)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimizer.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    state = optimizer.state[params[0]]
    moments = [v for v in state.values() if torch.is_tensor(v) and v.numel() == params[0].numel()]
    runs[name] = dict(params=params, managed=all(is_managed(m) for m in moments) if moments else None,
                      ms=1e3 * statistics.median(times[WARMUP:]), optimizer=optimizer)
    print(f"{name}: done; free {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB")

reference = runs["torch.optim.AdamW"]["params"]
print()
print(f"| optimizer | max abs diff vs torch after {STEPS} steps | state in managed memory | ms / step |")
print("| --- | --- | --- | --- |")
for name, run in runs.items():
    diff = max((p - q).abs().max().item() for p, q in zip(run["params"], reference))
    print(f"| {name} | {diff:.3g} | {run['managed']} | {run['ms']:.2f} |")
moved = max((p - w).abs().max().item() for p, w in zip(reference, start))
print(f"\nlargest parameter change over the run: {moved:.3g} (the diffs above are relative to this)")
print(f"free GPU memory: {free_before / 2**30:.1f} GiB before, {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB after")
