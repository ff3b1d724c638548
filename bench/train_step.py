"""Training-step benchmark (issues #6, #8, #17): our QLoRA step vs transformers + PEFT + bitsandbytes
and Unsloth, each side in its own process.

    python -m bench.train_step                        # Llama-2-7B shapes on the GPU: ours, peer, unsloth
    python -m bench.train_step --tiny                 # the same code at test size (CPU: ours only)
    python -m bench.train_step --sides ours,ours:offload+shared,unsloth:offload   # sides and levers
    python -m bench.train_step --side ours --json f   # one side in this process: what the parent runs
    python -m bench.train_step --show out/bench/train_step.json   # the tables of an earlier run again

Sides: `ours` is train.py's step as a user gets it by default (gradient_checkpointing true, recompute
full, one dropout mask per LoRA layer); after a colon, levers joined by "+" (issue #17):
    offload    gradient_checkpointing: offload (block inputs in pinned host memory)
    shared     lora_shared_dropout: true (q/k/v and gate/up share one mask and one A product)
    selective  recompute: selective (keep the C-wide frozen products)   none: recompute: none
    hostemb    embeddings_on_host: true (the frozen embedding table in host memory)
    compile    torch_compile: true (each block compiled; the warm-up steps take the compile)
`peer` is transformers + PEFT + bitsandbytes; `unsloth` is Unsloth with use_gradient_checkpointing=True,
`unsloth:offload` with "unsloth" (its offloaded checkpoints). Unsloth needs its wheels on the path the
child gets (--unsloth-path, shared/docs/PEERS.md) and a tokenizer (--tokenizer; default the Llama 2
tokenizer in .gpu-data/ or ../shared/data/).

After the timed steps each side runs one step with its phases' peaks (forward + loss, backward,
optimizer) and, on CUDA, one under torch's memory history: what was allocated at the step's peak, by
line of code (bench/memory_at_peak.py).

The lead's GPU call (one H200, about 7 minutes; carry .bnb, .whl/unsloth, .gpu-data):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-unsloth .whl/unsloth/*.whl
    PYTHONPATH=$PWD/.bnb HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 python -m bench.train_step \
        --sides ours,ours:shared,ours:offload,ours:offload+shared,ours:selective+shared,ours:none+shared,\
peer,unsloth,unsloth:offload --unsloth-path /tmp/site-unsloth --json $OUT/train_step.json

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
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.profiler import record_function

from bench.common import (CHECKPOINT_7B, CHECKPOINT_TINY, LINEAR, REPO, load_ours, load_peer, measure_load,
                          prepare_checkpoint, ratio, run_side_subprocess, size, time_steps, versions)
from bench.memory_at_peak import print_peak, record_peak
from bench.step_profile import print_profile, profile_step
from qlora.atomic import write_text
from qlora.trainer import pick_device

GOAL_SPEEDUP, GOAL_MEMORY = 2.0, 0.7     # issue #8: >= 2x the peer's tokens/s in <= 0.7x its peak memory
GOAL_UNSLOTH_SPEEDUP, GOAL_PEAK_GIB = 1.4, 4.6   # issue #17: >= 1.4x Unsloth's tokens/s, peak <= 4.6 GiB
LEVERS = {"ours": ("offload", "shared", "selective", "none", "hostemb", "compile"), "peer": (), "unsloth": ("offload",)}


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
    tokenizer: str = ""             # Unsloth loads one with the model: a tokenizer.model (Llama 2's)


TINY_SETTINGS = dict(checkpoint=CHECKPOINT_TINY, seq_len=128, timed_steps=3)


def random_batch(s: Settings, vocab_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same token ids on both sides (a CPU generator), labels = inputs."""
    ids = torch.randint(0, vocab_size, (s.micro_batch, s.seq_len), generator=torch.Generator().manual_seed(s.seed))
    ids = ids.to(device)
    return ids, ids


# ----------------------------------------------------------------------------- the sides

def parse_side(spec: str) -> tuple[str, tuple[str, ...]]:
    """"ours:offload+shared" -> ("ours", ("offload", "shared")); a ValueError naming the fix otherwise."""
    name, _, levers = spec.partition(":")
    chosen = tuple(levers.split("+")) if levers else ()
    if name not in LEVERS or any(lever not in LEVERS[name] for lever in chosen):
        raise ValueError(f"side {spec!r} is not known: use ours, peer or unsloth, and after a colon levers "
                         f"joined by + ({', '.join(f'{n}: {list(v)}' for n, v in LEVERS.items() if v)})")
    if "none" in chosen and ("selective" in chosen or "offload" in chosen):
        raise ValueError(f"side {spec!r}: recompute none leaves nothing to offload or keep selectively")
    if "compile" in chosen and "selective" in chosen:
        raise ValueError(f"side {spec!r}: compiled blocks do not take recompute selective")
    return name, chosen


def ours_config(s: Settings, levers: tuple[str, ...] = ()):
    """The TrainConfig of our side with its levers (module docstring)."""
    from qlora.config import TrainConfig

    recompute = "selective" if "selective" in levers else "none" if "none" in levers else "full"
    return TrainConfig(base_model=s.checkpoint, load_in_4bit=True, lora_r=s.lora_r, lora_alpha=s.lora_alpha,
                       lora_dropout=s.lora_dropout, learning_rate=s.learning_rate, weight_decay=0.0,
                       lr_scheduler="constant", warmup_steps=0, max_grad_norm=s.max_grad_norm,
                       optimizer="paged_adamw_32bit", gradient_checkpointing="offload" if "offload" in levers else True,
                       recompute=recompute, lora_shared_dropout="shared" in levers,
                       embeddings_on_host="hostemb" in levers, torch_compile="compile" in levers,
                       gradient_accumulation_steps=1,
                       micro_batch_size=s.micro_batch, sequence_len=s.seq_len, seed=s.seed)


def build_ours(s: Settings, device: torch.device, levers: tuple[str, ...] = ()):
    """train.py's model, optimizer and step -> (model, step(input_ids, labels) -> loss, info)."""
    from qlora import trainer

    cfg = ours_config(s, levers)
    dtype = trainer.pick_dtype(cfg, device)         # bf16 on the GPU, fp32 on the CPU (as train.py)
    model, load = measure_load(lambda: load_ours(cfg.base_model, device, dtype), device)
    step, info = ours_step(model, cfg, device, dtype, s.warmup_steps + s.timed_steps + 3)
    return model, step, dict(load=load, **info, gradient_checkpointing=str(cfg.gradient_checkpointing),
                             recompute=cfg.recompute, lora_shared_dropout=cfg.lora_shared_dropout)


def mark(step, phase: str) -> None:
    """The end of a phase of step() (forward, backward, optimizer): run_side's memory step listens."""
    if step.on_phase is not None:
        step.on_phase(phase)


def ours_step(model, cfg, device: torch.device, dtype: torch.dtype, total_steps: int):
    """train.py's adapters, optimizer and step on a loaded base model -> (step(input_ids, labels) -> loss,
    info). step.optimizer and step.params are the optimizer and the trainable parameters."""
    from qlora import trainer
    from qlora.checkpointing import compile_blocks, set_checkpointing
    from qlora.lora import apply_lora, count_parameters, share_dropout
    from qlora.loss import causal_lm_loss

    # train.py's lines in its order, through qlora/trainer.py as train.py calls it.
    set_checkpointing(model, cfg.gradient_checkpointing, cfg.recompute, cfg.embeddings_on_host)
    torch.manual_seed(cfg.seed)
    apply_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, verbose=False)
    share_dropout(model, cfg.lora_shared_dropout)
    if cfg.torch_compile:
        compile_blocks(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = trainer.make_optimizer(params, cfg, total_steps)
    autocast, scaler = trainer.mixed_precision(device, dtype)
    model.train()

    def step(input_ids, labels) -> float:
        with autocast:                                                   # train.py's loss_of
            hidden = model(input_ids, return_hidden=True)                # (B, T, C)
            with record_function("bench:loss"):
                loss = causal_lm_loss(hidden, model.lm_head.weight, labels)
        mark(step, "forward")
        scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
        step.enqueued = time.perf_counter()       # the host has launched forward and backward
        mark(step, "backward")
        loss_value = loss.item()                  # train.py: accumulate_gradients' one sync per step
        with record_function("bench:optimizer"):
            trainer.optimizer_step(optimizer, scaler, scheduler, params, cfg.max_grad_norm)
        mark(step, "optimizer")
        return loss_value

    step.optimizer, step.params, step.on_phase = optimizer, params, None
    trainable, total = count_parameters(model)
    return step, dict(compute_dtype=str(dtype), trainable_params=trainable, total_params=total)


def build_peer(s: Settings, device: torch.device):
    """transformers + PEFT + bitsandbytes, as a typical QLoRA script -> (model, step, info)."""
    import bitsandbytes  # noqa: F401  (imported before load_peer's clock starts)
    import transformers  # noqa: F401
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM  # noqa: F401

    model, load = measure_load(lambda: load_peer(s.checkpoint, device), device)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(s.seed)
    lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, target_modules="all-linear",
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    return model, peer_step(model, s, device), dict(load=load, **peer_info(model))


def peer_step(model, s: Settings, device: torch.device):
    """What a typical QLoRA script runs on a PEFT model (Trainer with bf16=True, bnb PagedAdamW32bit)
    -> step(input_ids, labels) -> loss; step.optimizer and step.params as for ours_step."""
    import bitsandbytes as bnb

    params = [p for p in model.parameters() if p.requires_grad]
    # bnb's default weight_decay is 1e-2; the Trainer (and ours) pass 0.
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=s.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda st: 1.0)
    model.train()

    def step(input_ids, labels) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):          # Trainer with bf16=True
            loss = model(input_ids=input_ids, labels=labels).loss
        mark(step, "forward")
        loss.backward()
        step.enqueued = time.perf_counter()
        mark(step, "backward")
        loss_value = loss.item()
        with record_function("bench:optimizer"):
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        mark(step, "optimizer")
        return loss_value

    step.optimizer, step.params, step.on_phase = optimizer, params, None
    return step


def peer_info(model) -> dict:
    trainable, total = model.get_nb_trainable_parameters()
    return dict(compute_dtype="torch.bfloat16", trainable_params=trainable, total_params=total)


def default_tokenizer() -> str:
    """The Llama 2 tokenizer where the GPU copy carries it (.gpu-data/) or beside the repository."""
    for path in (REPO / ".gpu-data" / "llama2-tokenizer.model",
                 REPO.parent / "shared" / "data" / "llama2-tokenizer.model"):
        if path.is_file():
            return str(path)
    return ""


def build_unsloth(s: Settings, device: torch.device, levers: tuple[str, ...] = ()):
    """Unsloth's FastLanguageModel (NF4 + double quant, bf16, its LoRA kernels, its checkpointing:
    "unsloth" offloads to the host, True is plain), trained by the peer's step -> (model, step, info)."""
    import unsloth  # noqa: F401  (before transformers, as Unsloth asks)
    from unsloth import FastLanguageModel

    directory = Path(s.checkpoint)
    if not (directory / "tokenizer_config.json").is_file():       # Unsloth loads a tokenizer with the model
        tokenizer = s.tokenizer or default_tokenizer()
        if not Path(tokenizer).is_file():
            raise FileNotFoundError(f"Unsloth needs a tokenizer and {tokenizer or 'none'} is not a file: pass "
                                    "--tokenizer llama2-tokenizer.model (or carry .gpu-data/)")
        from transformers import LlamaTokenizer
        LlamaTokenizer(vocab_file=tokenizer).save_pretrained(directory)

    def load():
        model, _ = FastLanguageModel.from_pretrained(model_name=str(directory), load_in_4bit=True, dtype=torch.bfloat16,
                                                     max_seq_length=s.seq_len, local_files_only=True)
        return model
    model, load_figures = measure_load(load, device)
    checkpointing = "unsloth" if "offload" in levers else True
    torch.manual_seed(s.seed)
    model = FastLanguageModel.get_peft_model(model, r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                                             target_modules=LINEAR, bias="none",
                                             use_gradient_checkpointing=checkpointing, random_state=s.seed)
    return model, peer_step(model, s, device), dict(load=load_figures, **peer_info(model),
                                                    gradient_checkpointing=str(checkpointing))


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

def run_side(spec: str, s: Settings, device: torch.device, do_profile: bool) -> dict:
    cuda = device.type == "cuda"
    name, levers = parse_side(spec)
    builders = {"ours": lambda: build_ours(s, device, levers), "peer": lambda: build_peer(s, device),
                "unsloth": lambda: build_unsloth(s, device, levers)}
    model, step, info = builders[name]()
    config = json.loads((Path(s.checkpoint) / "config.json").read_text())
    batch = random_batch(s, config["vocab_size"], device)
    print(f"{spec}: loaded in {info['load']['load_s']:.1f}s, resident {size(info['load']['resident_allocated'])}; "
          f"{info['trainable_params']:,d} trainable of {info['total_params']:,d} parameters", flush=True)

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    timing = time_steps(step, batch, s.warmup_steps, s.timed_steps, device, spec)
    result = dict(side=spec, device=str(device), settings=asdict(s), versions=versions(), **info, **timing,
                  tokens_per_s=s.micro_batch * s.seq_len / timing["median_step_s"],
                  flops_per_token=flops_per_token(config, s))
    if cuda:
        result.update(peak_allocated=torch.cuda.max_memory_allocated(device),
                      peak_reserved=torch.cuda.max_memory_reserved(device),
                      allocated_after_steps=torch.cuda.memory_allocated(device))
        print(f"{spec}: peak allocated {size(result['peak_allocated'])}, reserved {size(result['peak_reserved'])}",
              flush=True)
        try:       # extra steps under the allocator's history recorder, which has failed inside cross_entropy
            result["phase_peaks"] = phase_peaks(step, batch, device)
            result["at_peak"] = record_peak(lambda: step(*batch), device)
        except Exception as e:  # noqa: BLE001  (the timed figures above stand; the JSON says what failed)
            result["at_peak_error"] = repr(e)
            print(f"{spec}: memory breakdown failed: {e!r}", flush=True)
    if do_profile:
        result["profile"] = profile_step(model, step, batch, device)
    return result


def phase_peaks(step, batch, device: torch.device) -> dict:
    """One more step -> peak allocated bytes in each phase: forward (with the loss), backward, optimizer."""
    peaks = {"between steps": torch.cuda.memory_allocated(device)}

    def on_phase(phase):
        torch.cuda.synchronize(device)
        peaks[phase] = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step.on_phase = on_phase
    try:
        step(*batch)
    finally:
        step.on_phase = None
    return peaks


# ----------------------------------------------------------------------------- the parent: both sides, tables

def mfu(result: dict, ceiling_tflops: float | None, side: str) -> tuple[float | None, float | None]:
    if not ceiling_tflops or "tokens_per_s" not in result:
        return None, None
    f = result["flops_per_token"]
    hardware = f["model"] + f["recomputed_blocks"] + (f["recomputed_lm_head"] if side.startswith("ours") else 0)
    rate = result["tokens_per_s"] / (ceiling_tflops * 1e12)
    return rate * f["model"], rate * hardware


def best(results: dict, name: str, key: str, pick=max) -> tuple[str | None, float | None]:
    """(side, value) of the `name` sides (ours, peer, unsloth; any levers) with the best `key`."""
    found = [(spec, r[key]) for spec, r in results.items() if spec.split(":")[0] == name and r.get(key)]
    return pick(found, key=lambda kv: kv[1]) if found else (None, None)


def print_tables(results: dict, s: Settings, ceiling: float | None, device_name: str) -> None:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    gib = lambda v: "-" if v is None else f"{v / 2**30:.2f} GiB"  # noqa: E731
    print(f"\n## QLoRA training step, {Path(s.checkpoint).name} ({device_name}), micro-batch "
          f"{s.micro_batch} x {s.seq_len}, r={s.lora_r} all-linear, dropout {s.lora_dropout}, median of "
          f"{s.timed_steps} steps after {s.warmup_steps} warm-up\n")
    _, peer_speed = best(results, "peer", "tokens_per_s")
    uns_side, uns_speed = best(results, "unsloth", "tokens_per_s")
    uns_mem_side, uns_mem = best(results, "unsloth", "peak_allocated", min)
    print("| side | tokens/s | step | host launch | peak allocated | peak reserved | loss, steps 1-3 | MFU | HFU "
          "| aten ops / kernels | speed / peer | speed / best Unsloth | peak / least Unsloth |")
    print("|" + " --- |" * 13)
    for spec, r in results.items():
        if "tokens_per_s" not in r:
            print(f"| {spec} | {r.get('error') or r.get('skipped', '-')} |" + " |" * 11)
            continue
        m, h = mfu(r, ceiling, spec)
        prof = r.get("profile") or {}
        ops = f"{prof.get('aten_ops', '-')} / {prof.get('kernels') or '-'}" if prof else "-"
        losses = ", ".join(f"{x:.4f}" for x in r["losses"][:3])
        print(f"| {spec} | {r['tokens_per_s']:,.0f} | {r['median_step_s']:.3f} s | {r['median_host_enqueue_s']:.3f} s "
              f"| {gib(r.get('peak_allocated'))} | {gib(r.get('peak_reserved'))} | {losses} | {pct(m)} | {pct(h)} "
              f"| {ops} | {ratio(r['tokens_per_s'], peer_speed)} | {ratio(r['tokens_per_s'], uns_speed)} "
              f"| {ratio(r.get('peak_allocated'), uns_mem)} |")
    if ceiling:
        f = next((r["flops_per_token"] for r in results.values() if r.get("flops_per_token")), None)
        if f:
            print(f"\nbf16 8192^3 matmul ceiling {ceiling:.0f} TFLOP/s; model FLOPs per token "
                  f"{f['model'] / 1e9:.2f} G ({f['formula']}; N_base {f['n_base'] / 1e9:.3f}B, "
                  f"N_head {f['n_head'] / 1e6:.1f}M, N_lora {f['n_lora'] / 1e6:.1f}M)")

    phased = {spec: r for spec, r in results.items() if r.get("phase_peaks")}
    if phased:
        print("\n| side | resident model | between steps | peak in forward + loss | in backward | in optimizer |")
        print("|" + " --- |" * 6)
        for spec, r in phased.items():
            ph = r["phase_peaks"]
            print(f"| {spec} | {gib(r['load'].get('resident_allocated'))} | {gib(ph.get('between steps'))} "
                  f"| {gib(ph.get('forward'))} | {gib(ph.get('backward'))} | {gib(ph.get('optimizer'))} |")
    for spec, r in results.items():
        if r.get("at_peak"):
            print_peak(spec, r["at_peak"])

    ours_side, ours_speed = best(results, "ours", "tokens_per_s")
    mem_side, ours_mem = best(results, "ours", "peak_allocated", min)
    if ours_speed and uns_speed:
        speed = ours_speed / uns_speed
        print(f"\nissue #17 speed goal (>= {GOAL_UNSLOTH_SPEEDUP}x the best Unsloth, {uns_side}): {ours_side} "
              f"{speed:.2f}x: {'met' if speed >= GOAL_UNSLOTH_SPEEDUP else 'not met'}")
    if ours_mem:
        unsloth_part = f", {ours_mem / uns_mem:.2f}x the least Unsloth ({uns_mem_side})" if uns_mem else ""
        print(f"issue #17 memory goal (peak <= {GOAL_PEAK_GIB} GiB): {mem_side} {ours_mem / 2**30:.2f} GiB"
              f"{unsloth_part}: {'met' if ours_mem <= GOAL_PEAK_GIB * 2**30 else 'not met'}")
    print_profile({spec: r["profile"] for spec, r in results.items() if r.get("profile")})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help=f"checkpoint directory (default {CHECKPOINT_7B}, "
                                             f"{CHECKPOINT_TINY} with --tiny); written if missing")
    parser.add_argument("--tiny", action="store_true", help="test-size model and sequence (runs on the CPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    parser.add_argument("--sides", default="ours,peer,unsloth",
                        help="comma-separated sides: ours, peer, unsloth, each with :levers (module docstring)")
    parser.add_argument("--cpu-peer", action="store_true",
                        help="on the CPU, run the peer too (bitsandbytes' CPU backend; a smoke test only)")
    parser.add_argument("--unsloth-path", default="", help="a folder with Unsloth installed (pip --target), put "
                                                           "first on the unsloth sides' PYTHONPATH")
    parser.add_argument("--tokenizer", default="", help="tokenizer.model for Unsloth (default: the Llama 2 one "
                                                        "in .gpu-data/ or ../shared/data/)")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profiled step")
    parser.add_argument("--side", help=argparse.SUPPRESS)   # a child process: one side spec
    parser.add_argument("--json", help="write the results here (default out/bench/train_step.json)")
    parser.add_argument("--show", metavar="JSON", help="print the tables of an earlier run's JSON and exit")
    args = parser.parse_args(argv)
    if args.show:
        saved = json.loads(Path(args.show).read_text())
        results = saved["results"]
        print_tables(results, Settings(**saved["settings"]), saved["matmul_ceiling_tflops"],
                     next((r["versions"]["device"] for r in results.values() if "versions" in r), "?"))
        return 0
    s = Settings(**(TINY_SETTINGS if args.tiny else {}), tokenizer=args.tokenizer)
    if args.checkpoint:
        s = replace(s, checkpoint=args.checkpoint)
    sides = [args.side] if args.side else args.sides.split(",")
    for spec in sides:
        parse_side(spec)                          # a typo fails here, before anything loads
    device = pick_device(args.device)

    if args.side:
        result = run_side(args.side, s, device, args.profile)
        write_text(args.json, json.dumps(result, indent=2))
        return 0

    prepare_checkpoint(s.checkpoint, args.tiny)
    extra = ["--checkpoint", s.checkpoint, "--device", str(device)] + (["--tiny"] if args.tiny else []) + \
            ([] if args.profile else ["--no-profile"]) + (["--tokenizer", args.tokenizer] if args.tokenizer else [])
    out = Path(args.json or REPO / "out/bench/train_step.json")
    results = {}
    for spec in sides:
        name = spec.split(":")[0]
        if name != "ours" and device.type != "cuda" and not args.cpu_peer:
            print(f"\n=== {spec}: skipped on the CPU (the peers' CUDA paths are what is compared; --cpu-peer runs "
                  "the transformers peer on bitsandbytes' CPU backend as a smoke test)")
            results[spec] = {"side": spec, "skipped": "no CUDA device"}
            continue
        env = None
        if name == "unsloth" and args.unsloth_path:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (args.unsloth_path,
                                                                          os.environ.get("PYTHONPATH")) if p))
        results[spec] = run_side_subprocess("bench.train_step", spec, extra, env=env)
        # After every side: a device call cut short at its limit keeps the sides that finished.
        write_text(out, json.dumps({"settings": asdict(s), "matmul_ceiling_tflops": None, "results": results},
                                   indent=2))
    ceiling = matmul_ceiling_tflops(device) if device.type == "cuda" else None

    print_tables(results, s, ceiling, versions()["device"])
    for spec, result in results.items():
        if "error" in result or "skipped" in result:
            print(f"{spec}: {result.get('error') or 'skipped: ' + result['skipped']}")
    mfus = {spec: dict(zip(("mfu", "hfu"), mfu(r, ceiling, spec))) for spec, r in results.items()}
    write_text(out, json.dumps({"settings": asdict(s), "matmul_ceiling_tflops": ceiling, "mfu": mfus,
                               "results": results}, indent=2))
    print(f"details: {out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
