"""What is allocated at the peak of one training step, by the line of code that allocated it.

    figures = record_peak(lambda: step(*batch), device)   # one step under torch's memory history
    print_peak(figures)

torch.cuda.memory._record_memory_history logs every allocation and free of the caching allocator
with the Python stack that made it. Replaying that log finds the moment allocated memory was
highest; what was alive then is summed by the innermost frame outside torch and bench/ (our
modules, or the peer's: transformers, peft, bitsandbytes, unsloth). Memory allocated before the
step (weights, LoRA parameters, the optimizer's non-paged state) has no stack in the log: it is
one line of its own. CUDA managed memory (the paged optimizer's state) is not the allocator's and
is in no figure here, as in torch.cuda.max_memory_allocated.
"""

import torch

BEFORE = "allocated before the step (weights, adapters, optimizer tensors outside managed memory)"


def site_of(frames: list[dict]) -> str:
    """The innermost frame outside torch and bench/ as "path:line function" (path from the package)."""
    for f in frames:
        name = f.get("filename", "")
        if "torchinductor" in name:              # a compiled region's generated code (ours or Unsloth's)
            return "compiled code (torch.compile's generated kernels and buffers)"
        if "/torch/" in name or "/bench/" in name or name.startswith("<"):
            continue
        short = name.split("site-packages/", 1)[1] if "site-packages/" in name else name
        for top in ("/qlora/", "/llama/", "/falcon/", "/kernels/"):     # ours: from the package on
            if short is name and top in name:
                short = top[1:] + name.rsplit(top, 1)[1]
        return f"{short}:{f.get('line')} {f.get('name')}"
    return "torch internals (no frame outside torch)"


def peak_breakdown(trace: list[dict], baseline: int, top: int = 15) -> dict:
    """Replay one device's memory-history trace (torch's snapshot["device_traces"][i]) -> the peak
    (bytes, baseline included) and what was alive then: {site: bytes}, the `top` largest."""
    frees = {"free_completed"} if any(e["action"] == "free_completed" for e in trace) else {"free_requested"}

    def replay(stop: int | None):
        live, delta, best, best_at = {}, 0, 0, -1
        for i, e in enumerate(trace if stop is None else trace[:stop + 1]):
            if e["action"] == "alloc":
                live[e["addr"]] = (e["size"], e.get("frames", []))
                delta += e["size"]
                if delta > best:
                    best, best_at = delta, i
            elif e["action"] in frees:
                size, _ = live.pop(e["addr"], (e["size"], None))   # not in live: allocated before the step
                delta -= size
        return live, delta, best, best_at

    _, _, best, best_at = replay(None)
    live, delta, _, _ = replay(best_at)
    by_site: dict[str, int] = {}
    for size, frames in live.values():
        site = site_of(frames)
        by_site[site] = by_site.get(site, 0) + size
    before_alive = baseline + delta - sum(by_site.values())       # baseline minus what the step freed of it
    rows = sorted(by_site.items(), key=lambda kv: -kv[1])
    shown = dict(rows[:top])
    rest = sum(size for _, size in rows[top:])
    return {"peak": baseline + best, "baseline": baseline, "at_peak": {BEFORE: before_alive, **shown,
            **({f"{len(rows) - top} other sites": rest} if rest else {})}}


def record_peak(step, device: torch.device, top: int = 15) -> dict:
    """Run step() once under the allocator's memory history -> peak_breakdown of it."""
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    # context="alloc": stacks for allocations only (the replay needs no free's stack). With the
    # default "all", torch 2.11 failed inside a checkpointed cross_entropy's recompute (SystemError:
    # cross_entropy_loss returned NULL), which left our sides without this table.
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, context="alloc", stacks="python")
    try:
        step()
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return peak_breakdown(snapshot["device_traces"][index], baseline, top)


def print_peak(side: str, figures: dict) -> None:
    print(f"\n{side}: {figures['peak'] / 2**30:.2f} GiB allocated at the step's peak, of it:")
    for site, nbytes in figures["at_peak"].items():
        print(f"  {nbytes / 2**30:7.3f} GiB  {site}")
