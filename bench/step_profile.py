"""Where one training step's time goes: torch.profiler events grouped into the parts issue #8 asks
for (matmul, dequant, attention, norms, elementwise, loss, optimizer), for our step and the peer's.

    profile_step(model, step, batch, device)  -> {"rows": {row: us}, "top": ..., "wall_s": ...}
    print_profile({side: that dict})           -> the tables of docs/benchmarks.md

A kernel (GPU) or aten op (CPU) is attributed by the innermost named range it ran in: Scopes puts
one around the forward of each module scope_of() names, and around each call of SCOPED_FUNCTIONS.
"""

import contextlib
import functools
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function


# Module classes (ours and the peer's) whose forward becomes a named range in the profile.
def scope_of(module) -> str | None:
    name, where = type(module).__name__, type(module).__module__
    if where.startswith("peft") and hasattr(module, "lora_A") or name == "LoRALinear":
        return "lora"
    if name in ("Linear4bit", "Linear8bitLt"):            # qlora.linear4bit and bitsandbytes.nn
        return "base"
    if name.endswith("RMSNorm") or name == "LayerNorm":   # Llama's RMSNorm, Falcon's LayerNorm
        return "norm"
    if name in ("Attention", "LlamaAttention", "FalconAttention"):
        return "attention"
    if name in ("MLP", "LlamaMLP", "FalconMLP"):
        return "mlp"
    return None


# Functions (not modules) whose calls become a named range: (module, attribute, scope).
# qlora.lora._base_grad_input is the frozen base's input gradient inside LoRAFunction's backward,
# which would otherwise count as LoRA (the node's forward scope); _base_forward is the base's
# product inside LoRAFunction's forward (Linear4bit.product: no module call, so no module hook);
# shared_input_forward runs q/k/v (gate/up) adapters as one node, outside their modules' forward.
SCOPED_FUNCTIONS = [("llama.model", "apply_rope", "rope"), ("llama.model", "apply_rope_qk", "rope"),
                    ("llama.model", "apply_rope_fused", "rope"),
                    ("transformers.models.llama.modeling_llama", "apply_rotary_pos_emb", "rope"),
                    ("transformers.models.falcon.modeling_falcon", "apply_rotary_pos_emb", "rope"),
                    ("qlora.lora", "_base_grad_input", "base"), ("qlora.lora", "_base_forward", "base"),
                    ("llama.model", "shared_input_forward", "lora")]

# (row, group): the groups are the ones issue #8 asks for; the rows say where inside them.
ROWS = [("matmul: frozen base (4-bit linears)", "matmul"),
        ("matmul: LoRA A/B", "matmul"),
        ("matmul: lm_head", "matmul"),
        ("matmul: other", "matmul"),
        ("dequant (+ other ops inside the 4-bit linear)", "dequant"),
        ("attention (SDPA kernels)", "attention"),
        ("norms (RMSNorm, LayerNorm)", "norms"),
        ("RoPE", "elementwise"),
        ("MLP activation (SwiGLU; Falcon GELU)", "elementwise"),
        ("LoRA elementwise (dropout, scale, add, casts, grad accumulation)", "elementwise"),
        ("attention glue (transposes, copies)", "elementwise"),
        ("other elementwise (residual adds, embedding)", "elementwise"),
        ("loss (cross-entropy)", "loss"),
        ("optimizer (clip + AdamW)", "optimizer"),
        ("other (memcpy, memset, unattributed)", "other")]
GROUPS = ["matmul", "dequant", "attention", "norms", "elementwise", "loss", "optimizer", "other"]


def row_of(kernel: str, scope: str | None) -> str:
    """A kernel (GPU) or aten op (CPU) name and the innermost scope it ran in -> a row of ROWS."""
    n = kernel.lower()
    if any(w in n for w in ("flash", "fmha", "attention", "attn", "sdpa")):
        return "attention (SDPA kernels)"
    if "dequant" in n:
        return "dequant (+ other ops inside the 4-bit linear)"
    if any(w in n for w in ("gemm", "cutlass", "nvjet", "cublas", "xmma", "matmul", "sm90", "sm80",
                            "aten::mm", "aten::addmm", "aten::bmm", "aten::linear")):
        return {"base": "matmul: frozen base (4-bit linears)", "lora": "matmul: LoRA A/B",
                "loss": "matmul: lm_head"}.get(scope, "matmul: other")
    if scope == "base":       # what else the 4-bit linear runs; on the CPU reference path, the dequantization
        return "dequant (+ other ops inside the 4-bit linear)"
    if scope == "optimizer" or "multi_tensor" in n or "optimizer" in n:
        return "optimizer (clip + AdamW)"
    if scope == "loss" or any(w in n for w in ("softmax", "cross_entropy", "nll_loss")):
        return "loss (cross-entropy)"
    if n.startswith(("memcpy", "memset")) or scope == "unattributed":
        return "other (memcpy, memset, unattributed)"
    if scope == "norm" or "rms" in n or "layer_norm" in n:
        return "norms (RMSNorm, LayerNorm)"
    by_scope = {"rope": "RoPE", "mlp": "MLP activation (SwiGLU; Falcon GELU)",
                "lora": "LoRA elementwise (dropout, scale, add, casts, grad accumulation)",
                "attention": "attention glue (transposes, copies)"}
    return by_scope.get(scope, "other elementwise (residual adds, embedding)")


class Scopes:
    """While active, named record_function ranges mark where the step is: the forward of each module
    scope_of() names and of lm_head ("loss"), each call of SCOPED_FUNCTIONS, and the peer's loss
    function (ours has its ranges in build_ours' step). Everything is undone on exit.

    always_call: checkpointing's recomputation stops with an exception once it has rebuilt the saved
    tensors backward needs, in the middle of a forward; the range must close then too.
    """

    def __init__(self, model):
        self.model, self.stack, self.undo = model, [], []

    def _enter(self, name, *_):
        rf = record_function(f"bench:{name}")
        rf.__enter__()
        self.stack.append(rf)

    def _exit(self, *_):
        self.stack.pop().__exit__(None, None, None)

    @staticmethod
    def _scoped(name, fn):
        @functools.wraps(fn)
        def scoped(*args, **kwargs):
            with record_function(f"bench:{name}"):
                return fn(*args, **kwargs)
        return scoped

    def __enter__(self):
        for path, m in self.model.named_modules():
            name = "loss" if path.split(".")[-1] == "lm_head" else scope_of(m)
            if name:
                handles = [m.register_forward_pre_hook(functools.partial(self._enter, name)),
                           m.register_forward_hook(self._exit, always_call=True)]
                self.undo += [h.remove for h in handles]
            if type(m).__name__.endswith("ForCausalLM") and hasattr(type(m), "loss_function"):
                # transformers' model.loss_function has a setter that stores _loss_function
                m.loss_function = self._scoped("loss", m.loss_function)
                self.undo.append(functools.partial(delattr, m, "_loss_function"))
        for module_name, attr, name in SCOPED_FUNCTIONS:
            module = sys.modules.get(module_name)
            if module is not None and hasattr(module, attr):
                fn = getattr(module, attr)
                setattr(module, attr, self._scoped(name, fn))
                self.undo.append(functools.partial(setattr, module, attr, fn))
        return self

    def __exit__(self, *exc):
        for undo in reversed(self.undo):
            undo()


def group_profile(events, cuda: bool) -> dict:
    """Profiler events of one step -> {"rows": {row: microseconds}, "top": the 40 costliest kernels}:
    GPU kernel time on CUDA, self time of aten ops on the CPU.

    A kernel belongs to the op that launched it; the op's scope is its innermost bench:* range. A
    backward op gets the scope of the forward op that made its autograd node (same sequence number),
    so the backward of an RMSNorm counts as norm too. Kernels of the recomputed forward (gradient
    checkpointing) run inside the module hooks again and are scoped directly.
    """
    direct = {}                                   # id(event) -> scope from enclosing ranges only

    def range_scope(e):
        key = id(e)
        if key not in direct:
            if e.name.startswith("bench:"):
                direct[key] = e.name[len("bench:"):]
            else:
                direct[key] = range_scope(e.cpu_parent) if e.cpu_parent is not None else None
        return direct[key]

    def in_backward(e) -> bool:
        while e is not None:
            if e.name.startswith("autograd::engine::evaluate_function"):
                return True
            e = e.cpu_parent
        return False

    cpu_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    forward_scope = {}                            # (sequence_nr, thread) -> scope of the op that made the node
    for e in sorted(cpu_events, key=lambda e: e.time_range.start):   # inner (later) ops overwrite outer
        # Only the forward pass: backward nodes carry their forward op's number too, and recomputed
        # ops (inside backward) make nodes that never run.
        if e.sequence_nr >= 0 and not in_backward(e):
            forward_scope[(e.sequence_nr, e.thread)] = range_scope(e)

    full = {}

    def scope(e):
        key = id(e)
        if key not in full:
            if e.name.startswith("bench:"):
                full[key] = e.name[len("bench:"):]
            elif e.name.startswith("autograd::engine::evaluate_function"):
                full[key] = "lora" if "AccumulateGrad" in e.name else forward_scope.get((e.sequence_nr, e.fwd_thread))
            else:
                full[key] = scope(e.cpu_parent) if e.cpu_parent is not None else None
        return full[key]

    rows = {row: 0.0 for row, _ in ROWS}
    kernels = {}                                  # (name, row) -> [microseconds, launches]
    if cuda:
        work = [(k.name, k.duration, e) for e in cpu_events for k in e.kernels]
    else:
        work = [(e.name, e.self_cpu_time_total, e) for e in cpu_events
                if e.name.startswith("aten::") and e.self_cpu_time_total > 0]
    for name, us, e in work:
        row = row_of(name, scope(e))
        rows[row] += us
        if cuda and name.startswith(("Memcpy", "Memset")):     # say which op asked for the copy
            name = f"{name} <- {e.name}" + (f" <- {e.cpu_parent.name}" if e.cpu_parent is not None else "")
        entry = kernels.setdefault((name[:160], row), [0.0, 0])
        entry[0] += us
        entry[1] += 1
    if cuda:   # kernels the profiler could not tie to an op
        # Our record_function ranges ("bench:...") also appear on the GPU track as annotations that
        # span their kernels; counting them summed those kernels twice (the H100 run of 2026-11-23
        # showed 907 ms of "kernel time" in a 587 ms step). Count only real device work, each once.
        total = sum(e.time_range.elapsed_us() for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                    and not e.name.startswith(("bench:", "ProfilerStep")))
        rows["other (memcpy, memset, unattributed)"] += max(0.0, total - sum(rows.values()))
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:40]
    # Host side: the CUDA runtime calls by total time (a cudaHostAlloc or a synchronize in the step
    # shows here; kernels launched are only cudaLaunchKernel's microseconds).
    runtime = {}
    for e in cpu_events:
        if e.name.startswith("cu") and not e.name.startswith("cutlass"):
            entry = runtime.setdefault(e.name, [0.0, 0])
            entry[0] += e.time_range.elapsed_us()
            entry[1] += 1
    host = sorted(runtime.items(), key=lambda kv: -kv[1][0])[:12]
    return {"rows": rows, "top": [dict(name=n, row=r, us=us, count=c) for (n, r), (us, c) in top],
            "runtime": [dict(name=n, us=us, count=c) for n, (us, c) in host],
            "kernels": len(work) if cuda else None,
            "aten_ops": sum(1 for e in cpu_events if e.name.startswith("aten::") and
                            not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))}


def profile_step(model, step, batch, device) -> dict:
    """One step under torch.profiler -> {"rows": {row: us}, "wall_s": the step with the profiler on}."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # Compiled blocks (torch_compile: true) are profiled without the named ranges: hooks and wrapped
    # functions inside a compiled region change its code, so the profiled step would recompile every
    # block with graph breaks (and autotune its kernels) instead of running the step that was timed
    # (the H200 run of 2026-12-01, eighth session). Parts are then told apart by kernel name only.
    compiled = any(hasattr(m, "compiled_forward") for m in model.modules())
    with (contextlib.nullcontext() if compiled else Scopes(model)), profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step(*batch)
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    measures = "GPU kernel time" if cuda else "CPU self time of aten ops"
    return {**group_profile(prof.events(), cuda), "wall_s": wall,
            "measures": measures + ("; compiled blocks: parts by kernel name only" if compiled else "")}


def print_profile(profiled: dict) -> None:
    """The per-part table (ms and % of the measured time) for each profiled side, then the groups."""
    if not profiled:
        return
    sides = list(profiled)
    rows = {side: p["rows"] for side, p in profiled.items()}
    totals = {side: sum(r.values()) or 1.0 for side, r in rows.items()}
    columns = [f"{side} {unit}" for side in sides for unit in ("ms", "%")]

    def cells(side, us):
        return f"{us / 1e3:.1f} | {100 * us / totals[side]:.1f}"

    print(f"\n### Where one step's time goes ({profiled[sides[0]]['measures']}, one profiled step)\n")
    print("| " + " | ".join(["part", "group", *columns]) + " |\n|" + " --- |" * (2 + len(columns)))
    for row, group in ROWS:
        print(f"| {row} | {group} | " + " | ".join(cells(side, rows[side][row]) for side in sides) + " |")
    print("| **total** | | " + " | ".join(f"**{totals[side] / 1e3:.1f}** | 100" for side in sides) + " |")
    print("\n| " + " | ".join(["group", *columns]) + " |\n|" + " --- |" * (1 + len(columns)))
    for group in GROUPS:
        members = [row for row, g in ROWS if g == group]
        print(f"| {group} | " + " | ".join(cells(side, sum(rows[side][r] for r in members)) for side in sides) + " |")
    for side in sides:
        print(f"\n{side}: the 10 costliest kernels (40 in the JSON)")
        for k in profiled[side]["top"][:10]:
            print(f"  {k['us'] / 1e3:8.1f} ms {k['count']:6d}x  [{k['row'].split(' (')[0]}]  {k['name'][:100]}")
    for side in sides:
        if profiled[side].get("runtime"):
            print(f"\n{side}: the costliest CUDA runtime calls (host time)")
            for r in profiled[side]["runtime"][:8]:
                print(f"  {r['us'] / 1e3:8.1f} ms {r['count']:6d}x  {r['name'][:80]}")
    print()
    for side in sides:
        wall, busy = profiled[side]["wall_s"], totals[side] / 1e6
        print(f"{side}: profiled step {wall:.3f} s wall (profiler on), {busy:.3f} s measured "
              f"({100 * busy / wall:.0f}% of the wall time; the rest is idle GPU or profiler overhead); "
              f"{profiled[side].get('aten_ops')} aten ops called from Python, {profiled[side].get('kernels')} kernels")
