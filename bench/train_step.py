"""Training-step benchmark (issues #6, #8): our QLoRA step vs transformers + PEFT + bitsandbytes.

    python -m bench.train_step                        # Llama-2-7B shapes on the GPU, both sides
    python -m bench.train_step --tiny                 # the same code at test size (CPU: ours only)
    python -m bench.train_step --sides ours           # one side only (e.g. after a kernel change)
    python -m bench.train_step --side ours --json f   # one side in this process: what the parent runs
    python -m bench.train_step --show out/bench/train_step.json   # the tables of an earlier run again

Settings of shared/docs/PEER_BASELINE.md: NF4 + double quantization, bf16 compute, LoRA r=32
alpha=16 dropout 0.05 on every linear layer but lm_head, gradient checkpointing, micro-batch
2 x 2048 tokens, paged AdamW (32-bit state) lr 2e-4, no weight decay, grad-norm clip 1.0, one
fixed random batch with labels = inputs. Ours is train.py's step (load_llama, apply_lora,
PagedAdamW, causal_lm_loss under bf16 autocast); the peer is what a typical QLoRA script builds
(from_pretrained + BitsAndBytesConfig, gradient_checkpointing_enable(use_reentrant=False),
get_peft_model(target_modules="all-linear"), bnb PagedAdamW32bit; not prepare_model_for_kbit_training,
whose fp32 upcast of norms and embeddings PEER_BASELINE.md does not list). Each side runs in its own
process so its peak memory is its own. Timed: the median of 8 steps after 3 warm-up steps.

FLOPs per token, T = sequence length, L layers, N_base = frozen block linears (q,k,v,o,gate,up,down),
N_head = lm_head, N_lora = LoRA A and B; the frozen weights get no weight gradient:
    model FLOPs  = 4 (N_base + N_head) + 6 N_lora + 6 L d_attn T
                   (forward 2N, input gradient 2N; LoRA also its weight gradient 2N; causal attention,
                    QK^T and PV over T/2 keys on average: forward 2 L d_attn T, backward twice that)
    recomputed   = 2 N_base + 2 N_lora + 2 L d_attn T   (gradient checkpointing: each block's forward
                   runs again in backward); ours also recomputes lm_head (2 N_head, chunked loss)
MFU = tokens/s x model FLOPs / the bf16 8192^3 matmul rate measured in the same run; HFU counts
the recomputed FLOPs too. (The common 6N rule would count weight gradients the frozen base never has.)
"""

import argparse
import functools
import json
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench.load import (CHECKPOINT_7B, CHECKPOINT_TINY, REPO, load_ours, load_peer, measure_load, pick_device,
                        prepare_checkpoint, ratio, run_side_subprocess, size, versions)

GOAL_SPEEDUP, GOAL_MEMORY = 2.0, 0.7     # issue #8: >= 2x the peer's tokens/s in <= 0.7x its peak memory


@dataclass
class Settings:
    checkpoint: str = CHECKPOINT_7B
    micro_batch: int = 2
    seq_len: int = 2048
    lora_r: int = 32
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    learning_rate: float = 2e-4
    max_grad_norm: float = 1.0
    warmup_steps: int = 3           # untimed (Triton compiles and autotunes, the optimizer allocates state)
    timed_steps: int = 8
    seed: int = 0


TINY_SETTINGS = dict(checkpoint=CHECKPOINT_TINY, seq_len=128, timed_steps=3)


def random_batch(s: Settings, vocab_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same token ids on both sides (a CPU generator), labels = inputs."""
    ids = torch.randint(0, vocab_size, (s.micro_batch, s.seq_len), generator=torch.Generator().manual_seed(s.seed))
    ids = ids.to(device)
    return ids, ids


# ----------------------------------------------------------------------------- the two sides

def build_ours(s: Settings, device: torch.device):
    """train.py's model, optimizer and step -> (model, step(input_ids, labels) -> loss, info)."""
    import train
    from qlora.config import TrainConfig
    from qlora.lora import apply_lora, count_parameters
    from qlora.loss import causal_lm_loss
    from qlora.paged_adamw import PagedAdamW

    cfg = TrainConfig(base_model=s.checkpoint, load_in_4bit=True, lora_r=s.lora_r, lora_alpha=s.lora_alpha,
                      lora_dropout=s.lora_dropout, learning_rate=s.learning_rate, weight_decay=0.0,
                      lr_scheduler="constant", warmup_steps=0, max_grad_norm=s.max_grad_norm,
                      optimizer="paged_adamw_32bit", gradient_checkpointing=True, gradient_accumulation_steps=1,
                      micro_batch_size=s.micro_batch, sequence_len=s.seq_len, seed=s.seed)
    dtype = train.pick_dtype(cfg, device)           # bf16 on the GPU, fp32 on the CPU (as train.py)
    model, load = measure_load(lambda: load_ours(cfg.base_model, device, dtype), device)
    # From here on, train.py's lines in its order.
    model.gradient_checkpointing = cfg.gradient_checkpointing
    torch.manual_seed(s.seed)
    apply_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = PagedAdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                           paged=cfg.optimizer == "paged_adamw_32bit")
    total_steps = s.warmup_steps + s.timed_steps + 1
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda st: train.lr_factor(st, cfg, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    model.train()

    def step(input_ids, labels) -> float:
        with autocast:                                                   # train.py's loss_of
            hidden = model(input_ids, return_hidden=True)                # (B, T, C)
            with record_function("bench:loss"):
                loss = causal_lm_loss(hidden, model.lm_head.weight, labels)
        scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
        step.enqueued = time.perf_counter()       # the host has launched forward and backward
        loss_value = loss.item()
        with record_function("bench:optimizer"):
            train.optimizer_step(optimizer, scaler, scheduler, params, cfg.max_grad_norm)
        return loss_value

    trainable, total = count_parameters(model)
    info = dict(load=load, compute_dtype=str(dtype), trainable_params=trainable, total_params=total)
    return model, step, info


def build_peer(s: Settings, device: torch.device):
    """transformers + PEFT + bitsandbytes, as a typical QLoRA script -> (model, step, info)."""
    import bitsandbytes as bnb
    import transformers  # noqa: F401  (imported before load_peer's clock starts)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM  # noqa: F401

    model, load = measure_load(lambda: load_peer(s.checkpoint, device), device)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(s.seed)
    lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, target_modules="all-linear",
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    # bnb's default weight_decay is 1e-2; the Trainer (and ours) pass 0.
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=s.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda st: 1.0)
    model.train()

    def step(input_ids, labels) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):          # Trainer with bf16=True
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        step.enqueued = time.perf_counter()
        loss_value = loss.item()
        with record_function("bench:optimizer"):
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        return loss_value

    trainable, total = model.get_nb_trainable_parameters()
    info = dict(load=load, compute_dtype="torch.bfloat16", trainable_params=trainable, total_params=total)
    return model, step, info


# ----------------------------------------------------------------------------- profile: where the time goes

# Module classes (ours and the peer's) whose forward becomes a named range in the profile.
def scope_of(module) -> str | None:
    name, where = type(module).__name__, type(module).__module__
    if where.startswith("peft") and hasattr(module, "lora_A") or name == "LoRALinear":
        return "lora"
    if name in ("Linear4bit", "Linear8bitLt"):            # qlora.linear4bit and bitsandbytes.nn
        return "base"
    if name.endswith("RMSNorm"):
        return "norm"
    if name in ("Attention", "LlamaAttention"):
        return "attention"
    if name in ("MLP", "LlamaMLP"):
        return "mlp"
    return None


# Functions (not modules) whose calls become a named range: (module, attribute, scope).
# qlora.lora._base_grad_input is the frozen base's input gradient inside LoRAFunction's backward,
# which would otherwise count as LoRA (the node's forward scope).
SCOPED_FUNCTIONS = [("llama.model", "apply_rope", "rope"), ("llama.model", "apply_rope_qk", "rope"),
                    ("transformers.models.llama.modeling_llama", "apply_rotary_pos_emb", "rope"),
                    ("qlora.lora", "_base_grad_input", "base")]

# (row, group): the groups are the ones issue #8 asks for; the rows say where inside them.
ROWS = [("matmul: frozen base (4-bit linears)", "matmul"),
        ("matmul: LoRA A/B", "matmul"),
        ("matmul: lm_head", "matmul"),
        ("matmul: other", "matmul"),
        ("dequant (+ other ops inside the 4-bit linear)", "dequant"),
        ("attention (SDPA kernels)", "attention"),
        ("norms (RMSNorm)", "norms"),
        ("RoPE", "elementwise"),
        ("SwiGLU (silu, mul)", "elementwise"),
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
    if scope == "norm" or "rms" in n:
        return "norms (RMSNorm)"
    by_scope = {"rope": "RoPE", "mlp": "SwiGLU (silu, mul)",
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
    return {"rows": rows, "top": [dict(name=n, row=r, us=us, count=c) for (n, r), (us, c) in top],
            "kernels": len(work) if cuda else None,
            "aten_ops": sum(1 for e in cpu_events if e.name.startswith("aten::") and
                            not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))}


def profile_step(model, step, batch, device) -> dict:
    """One step under torch.profiler -> {"rows": {row: us}, "wall_s": the step with the profiler on}."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with Scopes(model), profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step(*batch)
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    return {**group_profile(prof.events(), cuda), "wall_s": wall,
            "measures": "GPU kernel time" if cuda else "CPU self time of aten ops"}


# ----------------------------------------------------------------------------- FLOPs

def flops_per_token(config: dict, s: Settings) -> dict:
    """Model and recomputed FLOPs per token (module docstring) from an HF config.json dict."""
    C, I, L, V = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    nh = config["num_attention_heads"]
    nkv = config.get("num_key_value_heads") or nh
    hd = config.get("head_dim") or C // nh
    q, kv = nh * hd, nkv * hd                                 # attention widths
    shapes = [(C, q), (C, kv), (C, kv), (q, C), (C, I), (C, I), (I, C)]   # (in, out) of q,k,v,o,gate,up,down
    n_base = L * sum(i * o for i, o in shapes)
    n_head = V * C
    n_lora = L * sum(s.lora_r * (i + o) for i, o in shapes)
    attn_fwd = 2 * L * q * s.seq_len                          # causal: QK^T and PV over T/2 keys on average
    return {"n_base": n_base, "n_head": n_head, "n_lora": n_lora,
            "model": 4 * (n_base + n_head) + 6 * n_lora + 3 * attn_fwd,
            "recomputed_blocks": 2 * n_base + 2 * n_lora + attn_fwd,
            "recomputed_lm_head": 2 * n_head,
            "formula": "model = 4 (N_base + N_head) + 6 N_lora + 3 * 2 L d_attn T; recomputed = 2 N_base + "
                       "2 N_lora + 2 L d_attn T (+ 2 N_head for ours: the chunked loss recomputes lm_head)"}


def matmul_ceiling_tflops(device) -> float:
    """Measured bf16 8192^3 matmul rate (TFLOP/s), as shared/docs/PEER_BASELINE.md."""
    from triton.testing import do_bench
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = do_bench(lambda: a @ b, return_mode="median") / 1e3
    return 2 * 8192**3 / seconds / 1e12


# ----------------------------------------------------------------------------- one side, in this process

def run_side(side: str, s: Settings, device: torch.device, do_profile: bool) -> dict:
    cuda = device.type == "cuda"
    model, step, info = (build_ours if side == "ours" else build_peer)(s, device)
    config = json.loads((Path(s.checkpoint) / "config.json").read_text())
    batch = random_batch(s, config["vocab_size"], device)
    print(f"{side}: loaded in {info['load']['load_s']:.1f}s, resident {size(info['load']['resident_allocated'])}; "
          f"{info['trainable_params']:,d} trainable of {info['total_params']:,d} parameters", flush=True)

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    losses, times, host = [], [], []
    for i in range(s.warmup_steps + s.timed_steps):
        t0 = time.perf_counter()
        losses.append(step(*batch))           # step() ends in .item() calls: the GPU is done
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        host.append(step.enqueued - t0)
        print(f"{side}: step {i + 1} loss {losses[-1]:.4f} {times[-1]:.3f}s"
              f"{' (warm-up)' if i < s.warmup_steps else ''}", flush=True)
    median = statistics.median(times[s.warmup_steps:])
    result = dict(side=side, device=str(device), settings=asdict(s), versions=versions(), **info,
                  losses=losses, step_times_s=times, median_step_s=median,
                  # Host time until backward() returned (all forward and backward kernels launched);
                  # close to the step time means the GPU waited on Python, not the other way round.
                  host_enqueue_s=host, median_host_enqueue_s=statistics.median(host[s.warmup_steps:]),
                  tokens_per_s=s.micro_batch * s.seq_len / median, flops_per_token=flops_per_token(config, s))
    if cuda:
        result.update(peak_allocated=torch.cuda.max_memory_allocated(device),
                      peak_reserved=torch.cuda.max_memory_reserved(device),
                      allocated_after_steps=torch.cuda.memory_allocated(device))
    if do_profile:
        result["profile"] = profile_step(model, step, batch, device)
    return result


# ----------------------------------------------------------------------------- the parent: both sides, tables

def mfu(result: dict, ceiling_tflops: float | None, side: str) -> tuple[float | None, float | None]:
    if not ceiling_tflops or "tokens_per_s" not in result:
        return None, None
    f = result["flops_per_token"]
    hardware = f["model"] + f["recomputed_blocks"] + (f["recomputed_lm_head"] if side == "ours" else 0)
    rate = result["tokens_per_s"] / (ceiling_tflops * 1e12)
    return rate * f["model"], rate * hardware


def print_tables(results: dict, s: Settings, ceiling: float | None, device_name: str) -> None:
    ours, peer = results.get("ours", {}), results.get("peer", {})

    def cell(r, key, fmt):
        return "-" if r.get(key) is None else fmt(r[key])

    def load_cell(r, key, fmt):
        return "-" if r.get("load", {}).get(key) is None else fmt(r["load"][key])

    print(f"\n## QLoRA training step, {Path(s.checkpoint).name} ({device_name}), micro-batch "
          f"{s.micro_batch} x {s.seq_len}, r={s.lora_r} all-linear, gradient checkpointing\n")
    print("| figure | ours | peer | ours / peer |\n| --- | --- | --- | --- |")
    rows = [(f"step time (median of {s.timed_steps} after {s.warmup_steps} warm-up)", "median_step_s",
             lambda v: f"{v:.3f} s"),
            ("throughput (tokens/s)", "tokens_per_s", lambda v: f"{v:,.0f}"),
            ("host time to launch forward + backward (median)", "median_host_enqueue_s", lambda v: f"{v:.3f} s"),
            ("peak allocated during training", "peak_allocated", size),
            ("peak reserved during training", "peak_reserved", size),
            ("trainable parameters", "trainable_params", lambda v: f"{v / 1e6:.1f}M")]
    for label, key, fmt in rows:
        print(f"| {label} | {cell(ours, key, fmt)} | {cell(peer, key, fmt)} | {ratio(ours.get(key), peer.get(key))} |")
    for label, key, fmt in [("resident model after loading (allocated)", "resident_allocated", size),
                            ("load time", "load_s", lambda v: f"{v:.1f} s"),
                            ("peak allocated during load", "peak_allocated", size)]:
        a, b = ours.get("load", {}).get(key), peer.get("load", {}).get(key)
        print(f"| {label} | {load_cell(ours, key, fmt)} | {load_cell(peer, key, fmt)} | {ratio(a, b)} |")
    fmt_losses = lambda r: ", ".join(f"{x:.4f}" for x in r["losses"][:3]) if r.get("losses") else "-"  # noqa: E731
    print(f"| loss, steps 1-3 | {fmt_losses(ours)} | {fmt_losses(peer)} | |")
    (m_ours, h_ours), (m_peer, h_peer) = mfu(ours, ceiling, "ours"), mfu(peer, ceiling, "peer")
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    print(f"| MFU (model FLOPs) | {pct(m_ours)} | {pct(m_peer)} | {ratio(m_ours, m_peer)} |")
    print(f"| HFU (with recomputation) | {pct(h_ours)} | {pct(h_peer)} | {ratio(h_ours, h_peer)} |")

    if ceiling:
        f = (ours or peer).get("flops_per_token")
        if f:
            print(f"\nbf16 8192^3 matmul ceiling {ceiling:.0f} TFLOP/s; model FLOPs per token "
                  f"{f['model'] / 1e9:.2f} G ({f['formula']}; N_base {f['n_base'] / 1e9:.3f}B, "
                  f"N_head {f['n_head'] / 1e6:.1f}M, N_lora {f['n_lora'] / 1e6:.1f}M)")
    if ours.get("losses") and peer.get("losses"):
        print(f"step-1 loss difference ours - peer: {ours['losses'][0] - peer['losses'][0]:+.4f} "
              "(B = 0 at step 1 on both sides: the same base model; later steps differ by LoRA init and dropout)")
    if all(r.get(key) for r in (ours, peer) for key in ("tokens_per_s", "peak_allocated")):
        speed, memory = ours["tokens_per_s"] / peer["tokens_per_s"], ours["peak_allocated"] / peer["peak_allocated"]
        print(f"issue #8 goal: speed {speed:.2f}x (goal >= {GOAL_SPEEDUP}x), peak memory {memory:.2f}x "
              f"(goal <= {GOAL_MEMORY}x): {'met' if speed >= GOAL_SPEEDUP and memory <= GOAL_MEMORY else 'not met'}")

    print_profile({side: r["profile"] for side, r in results.items() if r.get("profile")})


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
    print()
    for side in sides:
        wall, busy = profiled[side]["wall_s"], totals[side] / 1e6
        print(f"{side}: profiled step {wall:.3f} s wall (profiler on), {busy:.3f} s measured "
              f"({100 * busy / wall:.0f}% of the wall time; the rest is idle GPU or profiler overhead); "
              f"{profiled[side].get('aten_ops')} aten ops called from Python, {profiled[side].get('kernels')} kernels")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help=f"checkpoint directory (default {CHECKPOINT_7B}, "
                                             f"{CHECKPOINT_TINY} with --tiny); written if missing")
    parser.add_argument("--tiny", action="store_true", help="test-size model and sequence (runs on the CPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    parser.add_argument("--sides", default="ours,peer", help="comma-separated: ours, peer")
    parser.add_argument("--cpu-peer", action="store_true",
                        help="on the CPU, run the peer too (bitsandbytes' CPU backend; a smoke test only)")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profiled step")
    parser.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)   # a child process
    parser.add_argument("--json", help="write the results here (default out/bench/train_step.json)")
    parser.add_argument("--show", metavar="JSON", help="print the tables of an earlier run's JSON and exit")
    args = parser.parse_args(argv)
    if args.show:
        saved = json.loads(Path(args.show).read_text())
        results = saved["results"]
        print_tables(results, Settings(**saved["settings"]), saved["matmul_ceiling_tflops"],
                     next((r["versions"]["device"] for r in results.values() if "versions" in r), "?"))
        return 0
    s = Settings(**(TINY_SETTINGS if args.tiny else {}))
    if args.checkpoint:
        s = replace(s, checkpoint=args.checkpoint)
    device = pick_device(args.device)

    if args.side:
        result = run_side(args.side, s, device, args.profile)
        Path(args.json).write_text(json.dumps(result, indent=2))
        return 0

    prepare_checkpoint(s.checkpoint, args.tiny)
    extra = ["--checkpoint", s.checkpoint, "--device", str(device)] + (["--tiny"] if args.tiny else []) + \
            ([] if args.profile else ["--no-profile"])
    results = {}
    for side in args.sides.split(","):
        if side == "peer" and device.type != "cuda" and not args.cpu_peer:
            print("\n=== peer: skipped on the CPU (bitsandbytes' CUDA path is the peer; --cpu-peer runs its "
                  "CPU backend as a smoke test)")
            results[side] = {"side": side, "skipped": "no CUDA device"}
            continue
        results[side] = run_side_subprocess("bench.train_step", side, extra)
    ceiling = matmul_ceiling_tflops(device) if device.type == "cuda" else None

    print_tables(results, s, ceiling, versions()["device"])
    for side, result in results.items():
        if "error" in result or "skipped" in result:
            print(f"{side}: {result.get('error') or 'skipped: ' + result['skipped']}")
    out = Path(args.json or REPO / "out/bench/train_step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    mfus = {side: dict(zip(("mfu", "hfu"), mfu(r, ceiling, side))) for side, r in results.items()}
    out.write_text(json.dumps({"settings": asdict(s), "matmul_ceiling_tflops": ceiling, "mfu": mfus,
                               "results": results}, indent=2))
    print(f"details: {out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
