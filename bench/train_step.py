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
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.profiler import record_function

from bench.common import (CHECKPOINT_7B, CHECKPOINT_TINY, REPO, load_ours, load_peer, measure_load, prepare_checkpoint,
                          ratio, run_side_subprocess, size, time_steps, versions)
from bench.step_profile import print_profile, profile_step
from qlora.atomic import write_text
from qlora.trainer import pick_device

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
    from qlora import trainer
    from qlora.config import TrainConfig

    cfg = TrainConfig(base_model=s.checkpoint, load_in_4bit=True, lora_r=s.lora_r, lora_alpha=s.lora_alpha,
                      lora_dropout=s.lora_dropout, learning_rate=s.learning_rate, weight_decay=0.0,
                      lr_scheduler="constant", warmup_steps=0, max_grad_norm=s.max_grad_norm,
                      optimizer="paged_adamw_32bit", gradient_checkpointing=True, gradient_accumulation_steps=1,
                      micro_batch_size=s.micro_batch, sequence_len=s.seq_len, seed=s.seed)
    dtype = trainer.pick_dtype(cfg, device)         # bf16 on the GPU, fp32 on the CPU (as train.py)
    model, load = measure_load(lambda: load_ours(cfg.base_model, device, dtype), device)
    step, info = ours_step(model, cfg, device, dtype, s.warmup_steps + s.timed_steps + 1)
    return model, step, dict(load=load, **info)


def ours_step(model, cfg, device: torch.device, dtype: torch.dtype, total_steps: int):
    """train.py's adapters, optimizer and step on a loaded base model -> (step(input_ids, labels) -> loss,
    info). step.optimizer and step.params are the optimizer and the trainable parameters."""
    from qlora import trainer
    from qlora.lora import apply_lora, count_parameters
    from qlora.loss import causal_lm_loss

    # train.py's lines in its order, through qlora/trainer.py as train.py calls it.
    model.gradient_checkpointing = cfg.gradient_checkpointing
    torch.manual_seed(cfg.seed)
    apply_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = trainer.make_optimizer(params, cfg, total_steps)
    autocast, scaler = trainer.mixed_precision(device, dtype)
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
            trainer.optimizer_step(optimizer, scaler, scheduler, params, cfg.max_grad_norm)
        return loss_value

    step.optimizer, step.params = optimizer, params
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
        loss.backward()
        step.enqueued = time.perf_counter()
        loss_value = loss.item()
        with record_function("bench:optimizer"):
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        return loss_value

    step.optimizer, step.params = optimizer, params
    return step


def peer_info(model) -> dict:
    trainable, total = model.get_nb_trainable_parameters()
    return dict(compute_dtype="torch.bfloat16", trainable_params=trainable, total_params=total)


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
    timing = time_steps(step, batch, s.warmup_steps, s.timed_steps, device, side)
    result = dict(side=side, device=str(device), settings=asdict(s), versions=versions(), **info, **timing,
                  tokens_per_s=s.micro_batch * s.seq_len / timing["median_step_s"],
                  flops_per_token=flops_per_token(config, s))
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
        write_text(args.json, json.dumps(result, indent=2))
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
    mfus = {side: dict(zip(("mfu", "hfu"), mfu(r, ceiling, side))) for side, r in results.items()}
    write_text(out, json.dumps({"settings": asdict(s), "matmul_ceiling_tflops": ceiling, "mfu": mfus,
                               "results": results}, indent=2))
    print(f"details: {out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
