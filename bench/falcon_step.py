"""Falcon-7B benchmark (issue 15): the finance-alpaca recipe's QLoRA step and batch-1 decoding, ours vs
transformers + PEFT + bitsandbytes (the seed's stack), each side in its own process.

GPU (one H200, from /work/main's root after syncing the worktree to .gpu-falcon; about 4 minutes):

    cd .gpu-falcon && PYTHONPATH=$PWD/../.bnb timeout 540 python -m bench.falcon_step --json $OUT/falcon_step.json

    python -m bench.falcon_step --tiny            # the same code at test size on the CPU (ours only)
    python -m bench.falcon_step --tiny --cpu-peer # and the peer on bitsandbytes' CPU backend (smoke test)

One random Falcon-7B-shaped checkpoint (hidden 4544 = 71 heads x 64, multi-query, parallel attention,
vocab 65024, tied embeddings; bf16 safetensors shards written by transformers to /tmp once). The
recipe of configs/falcon-7b-finance.yml at micro-batch 4 x 512: NF4 + double quantization, LoRA r=64
alpha=16 dropout 0.1 on query_key_value, dense, dense_h_to_4h, dense_4h_to_h, gradient
checkpointing, paged AdamW (32-bit) lr 2e-4, grad-norm clip 0.3, 16-bit compute (--dtype, bf16 by
default; the notebook's fp16 with --dtype float16 adds a GradScaler on both sides); one fixed random
batch with labels = inputs. Timed: the median of 8 steps after 3 warm-up steps; peak memory is
torch.cuda.max_memory_allocated over the training steps (model included). Then batch-1 greedy decoding
of 128 new tokens after a 16-token prompt (ours eager and with the CUDA-graphed step; the peer's
generate), median of 2 after one warm-up (bench/decode.py's timing).

Ours: train.py's step (falcon.load.load_falcon, apply_lora, PagedAdamW, causal_lm_loss). The peer:
from_pretrained + BitsAndBytesConfig, gradient_checkpointing_enable(use_reentrant=False),
get_peft_model, bnb PagedAdamW32bit, the loss from model(labels=...) under autocast, as the
notebook's Trainer runs it. transformers 5 quantizes only modules whose type is exactly nn.Linear
(integrations/bitsandbytes.py, replace_with_bnb_linear), and Falcon's linears are FalconLinear, so
BitsAndBytesConfig leaves a Falcon in 16 bits; where that happens the peer's four linear layers are
replaced by bnb.nn.Linear4bit here (quantize_like_transformers), as transformers 4.x did.
"""

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import record_function

from bench.decode import peer_greedy, timed_runs
from bench.common import REPO, measure_load, ratio, run_side_subprocess, size, versions
from bench.step_profile import print_profile, profile_step
from qlora.trainer import pick_device

FALCON_7B = dict(hidden_size=4544, num_attention_heads=71, num_hidden_layers=32, vocab_size=65024,
                 multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False, alibi=False,
                 layer_norm_epsilon=1e-5, max_position_embeddings=2048, tie_word_embeddings=True,
                 bos_token_id=11, eos_token_id=11)
TINY = dict(FALCON_7B, hidden_size=240, num_attention_heads=5, num_hidden_layers=2, vocab_size=512)
CHECKPOINT_7B, CHECKPOINT_TINY = "/tmp/falcon-7b-random", "/tmp/falcon-tiny-random"
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
RECIPE = dict(micro_batch=4, seq_len=512, lora_r=64, lora_alpha=16, lora_dropout=0.1, learning_rate=2e-4,
              max_grad_norm=0.3, warmup_steps=3, timed_steps=8, new_tokens=128, prompt_len=16, repeats=2, seed=0)
TINY_RECIPE = dict(RECIPE, seq_len=64, lora_r=8, timed_steps=2, new_tokens=8, repeats=1)
GOAL_SPEEDUP, GOAL_MEMORY, GOAL_DECODE = 1.4, 0.9, 5.0     # issue 15


def write_falcon_checkpoint(path, shape: dict, seed: int = 0) -> Path:
    """config.json + bf16 safetensors shards of a random FalconForCausalLM, unless a finished one is there."""
    from transformers import FalconConfig, FalconForCausalLM

    path = Path(path)
    config_file = path / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("hidden_size") == shape["hidden_size"]:
        return path
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):          # initialising 7B parameters on the CPU takes minutes
        model = FalconForCausalLM(FalconConfig(**shape, torch_dtype="bfloat16")).to(torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="2GB", safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    if path.exists():
        import shutil
        shutil.rmtree(path)
    tmp.replace(path)
    return path


def quantize_like_transformers(model, compute_dtype: torch.dtype, double_quant: bool = True):
    """Replace transformers' Falcon linear layers named in TARGETS by bitsandbytes' NF4 Linear4bit
    (blocksize 64), what BitsAndBytesConfig(load_in_4bit, nf4) does to nn.Linear layers, in place."""
    import bitsandbytes as bnb

    for name, m in list(model.named_modules()):
        if name.split(".")[-1] in TARGETS and isinstance(m, torch.nn.Linear):
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, m.bias is not None, compute_dtype=compute_dtype,
                                  compress_statistics=double_quant, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(m.weight.data, requires_grad=False, compress_statistics=double_quant,
                                         quant_type="nf4", blocksize=64)
            if m.bias is not None:
                q.bias = m.bias
            model.set_submodule(name, q.to(m.weight.device))   # the move quantizes
            del m
    return model


def n_bnb_4bit(model) -> int:
    return sum(type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")
               for m in model.modules())


def load_peer(path, device: torch.device, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig, FalconForCausalLM

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = FalconForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype,
                                              attn_implementation="sdpa", device_map=str(device))
    if n_bnb_4bit(model) == 0:          # transformers 5: FalconLinear is not type nn.Linear (docstring)
        quantize_like_transformers(model, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cpu":            # the --cpu-peer smoke test: bitsandbytes' CPU weight repack breaks
        for m in model.modules():       # on out_features not divisible by 32 (tests/conftest.py says more)
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    return model


# ----------------------------------------------------------------------------- the two sides

def build_ours(path, r: dict, device, dtype):
    """train.py's model, optimizer and step -> (model, step(ids, labels) -> loss, info)."""
    from falcon.load import load_falcon
    from qlora.checkpointing import set_checkpointing
    from qlora.config import TrainConfig
    from qlora.lora import apply_lora, count_parameters
    from qlora.loss import causal_lm_loss
    from qlora.trainer import make_optimizer, mixed_precision, optimizer_step

    cfg = TrainConfig(base_model=str(path), lora_r=r["lora_r"], lora_alpha=r["lora_alpha"],
                      lora_dropout=r["lora_dropout"], lora_target_linear=False, lora_target_modules=TARGETS,
                      learning_rate=r["learning_rate"], lr_scheduler="constant", warmup_steps=0,
                      max_grad_norm=r["max_grad_norm"], gradient_checkpointing=True, weight_decay=0.0)
    model, load = measure_load(lambda: load_falcon(path, device, dtype, load_in_4bit=True), device)
    set_checkpointing(model, cfg.gradient_checkpointing, cfg.recompute)
    torch.manual_seed(r["seed"])
    apply_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, verbose=False)
    model.train()                                    # as the Trainer does: dropout on, checkpointing on
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg, r["warmup_steps"] + r["timed_steps"] + 1)
    autocast, scaler = mixed_precision(device, dtype)

    def step(input_ids, labels) -> float:
        with autocast:
            hidden = model(input_ids, return_hidden=True)
            with record_function("bench:loss"):          # the profile's ranges, as bench/train_step.py
                loss = causal_lm_loss(hidden, model.lm_head.weight, labels)
        scaler.scale(loss).backward()
        value = loss.item()
        with record_function("bench:optimizer"):
            optimizer_step(optimizer, scaler, scheduler, params, cfg.max_grad_norm)
        return value

    trainable, total = count_parameters(model)
    return model, step, dict(load=load, trainable_params=trainable, total_params=total)


def build_peer(path, r: dict, device, dtype):
    """transformers + PEFT + bitsandbytes as the notebook's Trainer runs them -> (model, step, info)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import FalconForCausalLM  # noqa: F401  (imported before the clock starts)

    model, load = measure_load(lambda: load_peer(path, device, dtype), device)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(r["seed"])
    model = get_peft_model(model, LoraConfig(r=r["lora_r"], lora_alpha=r["lora_alpha"], lora_dropout=r["lora_dropout"],
                                             target_modules=TARGETS, bias="none", task_type="CAUSAL_LM"))
    model.train()     # from_pretrained returns eval mode, where HF skips checkpointing and dropout; Trainer calls train()
    info_checkpointing = bool(model.base_model.model.is_gradient_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=r["learning_rate"], weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(input_ids, labels) -> float:
        with torch.autocast(device.type, dtype=dtype):
            loss = model(input_ids=input_ids, labels=labels).loss
        scaler.scale(loss).backward()
        value = loss.item()
        with record_function("bench:optimizer"):
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, r["max_grad_norm"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        return value

    trainable, total = model.get_nb_trainable_parameters()
    return model, step, dict(load=load, trainable_params=trainable, total_params=total, peer_4bit_layers=n_bnb_4bit(model),
                             gradient_checkpointing=info_checkpointing)


def decode_ours(model, prompt, r, device, cuda_graph: bool) -> dict:
    from llama.generate import generate

    def run(on_token):
        return generate(model, [prompt], r["new_tokens"], eos_id=None, on_token=on_token, cuda_graph=cuda_graph)[0]
    return timed_runs(run, device, r["repeats"])


def decode_peer(model, prompt, r, device) -> dict:
    return timed_runs(peer_greedy(model, prompt, r["new_tokens"], device), device, r["repeats"])


def run_side(side: str, path, r: dict, device: torch.device, dtype: torch.dtype) -> dict:
    cuda = device.type == "cuda"
    model, step, info = (build_ours if side == "ours" else build_peer)(path, r, device, dtype)
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(r["seed"])
    ids = torch.randint(0, vocab, (r["micro_batch"], r["seq_len"]), generator=gen).to(device)
    print(f"{side}: loaded in {info['load']['load_s']:.1f}s, resident {size(info['load']['resident_allocated'])}, "
          f"{info['trainable_params']:,d} trainable parameters", flush=True)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(r["warmup_steps"] + r["timed_steps"]):
        t0 = time.perf_counter()
        losses.append(step(ids, ids))
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        print(f"{side}: step {i + 1} loss {losses[-1]:.4f} {times[-1]:.3f}s", flush=True)
    median = statistics.median(times[r["warmup_steps"]:])
    result = dict(side=side, device=str(device), dtype=str(dtype), recipe=r, versions=versions(), **info,
                  losses=losses, step_times_s=times, median_step_s=median,
                  tokens_per_s=r["micro_batch"] * r["seq_len"] / median,
                  peak_allocated=torch.cuda.max_memory_allocated(device) if cuda else None)
    result["profile"] = profile_step(model, step, (ids, ids), device)    # one more step, where the time goes

    # ---- batch-1 decoding with the trained adapters in place (the notebook's inference setting)
    model.eval()
    if side == "peer":
        model.config.use_cache = True
    prompt = torch.randint(0, vocab, (r["prompt_len"],), generator=gen).tolist()
    with torch.no_grad():
        if side == "ours":
            result["decode"] = decode_ours(model, prompt, r, device, cuda_graph=False)
            if cuda:
                result["decode_graph"] = decode_ours(model, prompt, r, device, cuda_graph=True)
        else:
            result["decode"] = decode_peer(model, prompt, r, device)
    for key in ("decode", "decode_graph"):
        if key in result:
            print(f"{side}: {key} {result[key]['tokens_per_s']:.1f} tokens/s", flush=True)
    del model
    gc.collect()
    return result


# ----------------------------------------------------------------------------- the parent

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help=f"default {CHECKPOINT_7B} ({CHECKPOINT_TINY} with --tiny); written if missing")
    p.add_argument("--tiny", action="store_true", help="test-size model and batch (runs on the CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="compute dtype of both sides")
    p.add_argument("--sides", default="ours,peer")
    p.add_argument("--cpu-peer", action="store_true", help="on the CPU, run the peer too (a smoke test)")
    p.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)   # a child process
    p.add_argument("--json", help="write the results here (default out/bench/falcon_step.json)")
    args = p.parse_args(argv)
    path = args.checkpoint or (CHECKPOINT_TINY if args.tiny else CHECKPOINT_7B)
    device = pick_device(args.device)
    recipe = TINY_RECIPE if args.tiny else RECIPE
    # The CPU runs fp32 (train.py's choice there; the CPU peer needs it too).
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32

    if args.side:
        Path(args.json).write_text(json.dumps(run_side(args.side, path, recipe, device, dtype), indent=2))
        return 0

    t0 = time.perf_counter()
    write_falcon_checkpoint(path, TINY if args.tiny else FALCON_7B)
    print(f"checkpoint {path} ready in {time.perf_counter() - t0:.1f}s", flush=True)
    extra = ["--checkpoint", path, "--device", str(device), "--dtype", args.dtype] + ["--tiny"] * args.tiny
    results = {}
    for side in args.sides.split(","):
        if side == "peer" and device.type != "cuda" and not args.cpu_peer:
            results[side] = {"side": side, "skipped": "no CUDA device (--cpu-peer runs bitsandbytes' CPU backend)"}
            continue
        results[side] = run_side_subprocess("bench.falcon_step", side, extra)

    ours, peer = results.get("ours", {}), results.get("peer", {})
    dec = lambda res, key="decode": res.get(key, {}).get("tokens_per_s")  # noqa: E731
    print(f"\n## Falcon-7B QLoRA recipe ({versions()['device']}, {dtype}), micro-batch {recipe['micro_batch']} x "
          f"{recipe['seq_len']}, r={recipe['lora_r']} on {', '.join(TARGETS)}\n")
    print("| figure | ours | peer | ours / peer |\n| --- | --- | --- | --- |")
    rows = [("training tokens/s", ours.get("tokens_per_s"), peer.get("tokens_per_s"), lambda v: f"{v:,.0f}"),
            ("median step", ours.get("median_step_s"), peer.get("median_step_s"), lambda v: f"{v:.3f} s"),
            ("peak allocated (training)", ours.get("peak_allocated"), peer.get("peak_allocated"), size),
            ("load time", ours.get("load", {}).get("load_s"), peer.get("load", {}).get("load_s"), lambda v: f"{v:.1f} s"),
            ("decode tokens/s, batch 1 (eager)", dec(ours), dec(peer), lambda v: f"{v:.1f}"),
            ("decode tokens/s, batch 1 (CUDA graph)", dec(ours, "decode_graph"), dec(peer), lambda v: f"{v:.1f}")]
    for label, a, b, fmt in rows:
        print(f"| {label} | {'-' if a is None else fmt(a)} | {'-' if b is None else fmt(b)} | {ratio(a, b)} |")
    for side, res in results.items():
        if "error" in res or "skipped" in res:
            print(f"\n{side}: {res.get('error') or 'skipped: ' + res['skipped']}")
    print_profile({side: res["profile"] for side, res in results.items() if res.get("profile")})
    if peer.get("gradient_checkpointing") is not None:
        print(f"\npeer: gradient checkpointing in effect: {peer['gradient_checkpointing']}")
    if peer.get("peer_4bit_layers") is not None:
        print(f"\npeer: {peer['peer_4bit_layers']} bitsandbytes Linear4bit layers")
    if ours.get("tokens_per_s") and peer.get("tokens_per_s") and ours.get("peak_allocated"):
        best = max(v for v in (dec(ours), dec(ours, "decode_graph")) if v)
        print(f"goals: tokens/s >= {GOAL_SPEEDUP}x: {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x; "
              f"memory <= {GOAL_MEMORY}x: {ours['peak_allocated'] / peer['peak_allocated']:.2f}x; "
              f"decode >= {GOAL_DECODE}x: {best / dec(peer):.2f}x")
    out = Path(args.json or REPO / "out/bench/falcon_step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": str(path), "tiny": args.tiny, "results": results}, indent=2))
    print(f"details: {out}")
    return 0 if all("error" not in res for res in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
