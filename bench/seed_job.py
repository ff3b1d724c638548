"""The speed a user of the seed feels (issue 14, item 5): one epoch of the seed's sql.yml job.

Llama-2-7B shapes (a random checkpoint), the seed's settings: sequence_len 2048, micro-batch 2,
gradient accumulation 4, LoRA r=32 alpha=16 dropout 0.05 on every linear layer, gradient
checkpointing, paged AdamW 32-bit lr 2e-4, fp16 autocast + gradient scaler (the YAML's fp16: true).
Rows: the lengths of real text-to-SQL rows tokenized with the Llama 2 tokenizer in the chat
context_qa format (--format to change): the built-in know_sql-like generator (3,000 rows) and
../shared/data/spider_dev.jsonl (1,034 Spider dev rows, full-database CREATE TABLE contexts). The
rows' own token ids are trained on (labels: the answer tokens, as train_on_inputs: false).

Sides, each in its own process (its peak memory its own), each timing both datasets:
    hf            (a) transformers + PEFT + bitsandbytes padded to 2048, as the seed runs it
                      (attention_mask on the padding, HF's loss, bnb PagedAdamW32bit, GradScaler)
    ours          (b) train.py's step with the seed's YAML (padded to 2048)
    ours_packed   (c) the same with sample_packing: true (rows kept apart: FlexAttention block masks)
    unsloth       (d) Unsloth padded to 2048 (attention_mask, as its collator gives)
    unsloth_packed(d) Unsloth padding-free packing (its packed_seq_lengths path: the micro-batch's
                      2 x 2048 packed tokens as one row with per-row position_ids)
Timed: --warmup optimizer steps untimed (compiles, autotuning, optimizer state) then --steps timed
optimizer steps of 4 micro-batches each, per dataset. Reported per side and dataset: useful
(non-pad) tokens/s, optimizer steps/s, projected time for one epoch of that dataset (steps per epoch
/ steps per second; --epoch_rows N projects an epoch of N rows of that length mix instead).

CPU smoke test (tiny model, ours and ours_packed only):
    python -m bench.seed_job --tiny
GPU (the lead): rsync this worktree to /work/main/.gpu-seedjob and copy the two data files in
(rsync -a --delete --exclude .git --exclude .venv /work/wt-seedjob/ /work/main/.gpu-seedjob/ &&
mkdir -p /work/main/.gpu-seedjob/.data && cp /work/shared/data/{llama2-tokenizer.model,spider_dev.jsonl}
/work/main/.gpu-seedjob/.data/), then run with carry [".gpu-seedjob", ".bnb", ".whl"], about 6 minutes:
    cd .gpu-seedjob && python3 -m pip install -q --no-index --no-deps --no-compile \
      --target /tmp/site-unsloth ../.whl/unsloth/*.whl && PYTHONPATH=$PWD/../.bnb HF_HUB_OFFLINE=1 \
      UNSLOTH_DISABLE_STATISTICS=1 python -m bench.seed_job --data .data --unsloth_path /tmp/site-unsloth \
      --json $OUT/seed_job.json
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bench.common import (CHECKPOINT_7B, CHECKPOINT_TINY, LINEAR, REPO, load_ours, load_peer, prepare_checkpoint,
                          run_side_subprocess, size, versions)
from qlora.trainer import pick_device

SHARED_DATA = REPO.parent / "shared" / "data"     # beside the repository, as tests/conftest.py finds it
SIDES = ("hf", "ours", "ours_packed", "unsloth", "unsloth_packed")
GOALS = {"builtin": 20.0, "spider": 4.0}   # (c) over (a), useful tokens/s


@dataclass
class Settings:
    checkpoint: str = CHECKPOINT_7B
    sequence_len: int = 2048
    micro_batch: int = 2
    grad_accum: int = 4
    format: str = "context_qa"
    warmup: int = 1
    steps: int = 2
    rows: int = 0                    # 0: every row of each dataset; else the first N (the smoke test)
    epoch_rows: int = 0              # 0: an epoch is the dataset itself
    seed: int = 0
    data: str = str(SHARED_DATA)     # holds llama2-tokenizer.model and spider_dev.jsonl


TINY = dict(checkpoint=CHECKPOINT_TINY, sequence_len=512, rows=120, warmup=1, steps=1)


# ----------------------------------------------------------------------------- the rows

def datasets(s: Settings, vocab_size: int) -> dict:
    """name -> Examples of that dataset in the seed's tokenization (prompt and answer apart)."""
    from llama.tokenizer import Tokenizer
    from qlora.data import load_rows, tokenize_rows
    from qlora.sql_dataset import sql_rows

    tokenizer_path, spider = Path(s.data) / "llama2-tokenizer.model", Path(s.data) / "spider_dev.jsonl"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path} not found: the row lengths need the Llama 2 tokenizer "
                                "(pass --data DIR holding llama2-tokenizer.model and spider_dev.jsonl)")
    tokenizer = Tokenizer(tokenizer_path)
    sources = {"builtin": sql_rows(3000, seed=0)}
    if spider.is_file():
        sources["spider"] = load_rows(str(spider))
    else:
        print(f"note: {spider} not found: the Spider rows are left out", flush=True)
    out = {}
    for name, rows in sources.items():
        rows = rows[:s.rows or None]
        examples, dropped = tokenize_rows(rows, s.format, tokenizer, s.sequence_len)
        examples = [e for e in examples if e is not None]
        if vocab_size < tokenizer.vocab_size:         # the tiny model: same lengths, ids folded into its vocab
            for e in examples:
                e.input_ids = [i % vocab_size for i in e.input_ids]
                e.labels = [l if l < 0 else l % vocab_size for l in e.labels]
        out[name] = {"examples": examples, "dropped": dropped}
    return out


def percentiles(examples) -> dict:
    n = np.array([len(e.input_ids) for e in examples])
    return {"rows": len(n), "p10": int(np.percentile(n, 10)), "p50": int(np.percentile(n, 50)),
            "p90": int(np.percentile(n, 90)), "mean": round(float(n.mean()), 1), "max": int(n.max())}


def micro_batches(examples, s: Settings, packed: bool, count: int) -> tuple[list[dict], int]:
    """`count` collated micro-batches from a seeded shuffle, and micro-batches per epoch."""
    from qlora.data import collate, pack

    items = pack(examples, s.sequence_len) if packed else examples
    order = np.random.default_rng(s.seed).permutation(len(items))
    per_epoch = math.ceil(len(items) / s.micro_batch)
    out = []
    for b in range(count):                            # consecutive micro-batches of the shuffled order
        chosen = [order[(b * s.micro_batch + j) % len(items)] for j in range(s.micro_batch)]
        out.append(collate([items[i] for i in chosen], 0, pad_to=s.sequence_len))
    return out, per_epoch


# ----------------------------------------------------------------------------- the sides

def build_ours(s: Settings, device, packed: bool):
    """train.py's pieces with the seed's YAML (configs/sql.yml) -> (step(micro_batches) -> loss, info)."""
    from qlora.checkpointing import set_checkpointing
    from qlora.config import from_dict, load_yaml
    from qlora.lora import apply_lora, count_parameters
    from qlora.trainer import accumulate_gradients, make_optimizer, mixed_precision, optimizer_step, pick_dtype

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")              # the YAML's ignored keys: named in train.py's run
        cfg = from_dict({**load_yaml(REPO / "configs" / "sql.yml"), "base_model": s.checkpoint,
                         "sample_packing": packed, "sequence_len": s.sequence_len})
    dtype = pick_dtype(cfg, device)
    model = load_ours(cfg.base_model, device, dtype)
    set_checkpointing(model, cfg.gradient_checkpointing, cfg.recompute)
    torch.manual_seed(s.seed)
    apply_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    # the YAML's schedule (warmup 10 from lr 0) over a long run: the timed steps' update sizes are real
    optimizer, scheduler = make_optimizer(params, cfg, total_steps=10_000)
    autocast, scaler = mixed_precision(device, dtype)
    model.train()

    def loss_of(batch, num_items):                   # train.py's loss_of
        from qlora.loss import causal_lm_loss
        extra = {k: batch[k].to(device) for k in ("position_ids", "segment_ids") if k in batch}
        with autocast:
            hidden = model(batch["input_ids"].to(device), return_hidden=True, **extra)
            return causal_lm_loss(hidden, model.lm_head.weight, batch["labels"].to(device), num_items=num_items)

    def step(batches) -> float:
        loss = accumulate_gradients(batches, loss_of, lambda l: scaler.scale(l).backward())
        optimizer_step(optimizer, scaler, scheduler, params, cfg.max_grad_norm)
        return loss

    trainable, total = count_parameters(model)
    return step, dict(compute_dtype=str(dtype), trainable_params=trainable, total_params=total)


def build_hf(s: Settings, device, packed: bool):
    """transformers + PEFT + bitsandbytes as axolotl runs the seed's YAML (fp16, padded)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    model = load_peer(s.checkpoint, device, dtype=torch.float16)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(s.seed)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=16, lora_dropout=0.05, target_modules=LINEAR,
                                             bias="none", task_type="CAUSAL_LM"))
    return _hf_style_step(model, bnb, s, device, unsloth=False)


def build_unsloth(s: Settings, device, packed: bool):
    """Unsloth's FastLanguageModel (NF4, fp16, its LoRA kernels and gradient checkpointing)."""
    import unsloth  # noqa: F401  (before transformers, as Unsloth asks)
    from unsloth import FastLanguageModel
    import bitsandbytes as bnb

    directory = Path(s.checkpoint)
    if not (directory / "tokenizer_config.json").is_file():   # Unsloth loads a tokenizer with the model
        from transformers import LlamaTokenizer
        LlamaTokenizer(vocab_file=str(Path(s.data) / "llama2-tokenizer.model")).save_pretrained(directory)
    model, _ = FastLanguageModel.from_pretrained(model_name=str(directory), load_in_4bit=True, dtype=torch.float16,
                                                 max_seq_length=s.sequence_len, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=32, lora_alpha=16, lora_dropout=0.05, target_modules=LINEAR,
                                             bias="none", use_gradient_checkpointing=True, random_state=s.seed)
    return _hf_style_step(model, bnb, s, device, unsloth=True)


def _hf_style_step(model, bnb, s: Settings, device, unsloth: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=2e-4, weight_decay=0.0)
    # The Trainer's fp16 loss scaling; GradScaler cannot unscale fp16 gradients, so it runs only
    # where the adapters are fp32 (PEFT upcasts them; the JSON records what ran).
    scaled = all(p.dtype == torch.float32 for p in params)
    scaler = torch.amp.GradScaler("cuda", enabled=scaled)
    model.train()

    def forward(batch):
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        if "position_ids" in batch:                  # packed: one row of B x T tokens, positions per row
            return model(input_ids=ids.reshape(1, -1), labels=labels.reshape(1, -1),
                         position_ids=batch["position_ids"].to(device).reshape(1, -1)).loss
        return model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), labels=labels).loss

    def step(batches) -> float:
        total = 0.0
        for batch in batches:
            with torch.autocast("cuda", dtype=torch.float16):
                loss = forward(batch) / len(batches)
            scaler.scale(loss).backward()
            total += loss.item()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return total

    trainable, total = model.get_nb_trainable_parameters()
    return step, dict(compute_dtype="torch.float16", trainable_params=trainable, total_params=total,
                      adapter_dtype=str(params[0].dtype), loss_scaling=scaled)


BUILDERS = {"hf": build_hf, "ours": build_ours, "ours_packed": build_ours, "unsloth": build_unsloth,
            "unsloth_packed": build_unsloth}


def run_side(side: str, s: Settings, device) -> dict:
    """Build the side once, then time it on each dataset -> the side's JSON."""
    packed = side.endswith("_packed")
    config = json.loads((Path(s.checkpoint) / "config.json").read_text())
    data = datasets(s, config["vocab_size"])
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    step, info = BUILDERS[side](s, device, packed)
    result = dict(side=side, settings=asdict(s), versions=versions(), build_s=time.perf_counter() - t0, **info,
                  datasets={})
    print(f"{side}: built in {result['build_s']:.1f}s; {info['trainable_params']:,d} trainable", flush=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for name, d in data.items():
        count = (s.warmup + s.steps) * s.grad_accum
        batches, per_epoch = micro_batches(d["examples"], s, packed, count)
        times, useful, losses = [], [], []
        for i in range(s.warmup + s.steps):
            group = batches[i * s.grad_accum:(i + 1) * s.grad_accum]
            if cuda:
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            losses.append(step(group))
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
            useful.append(sum(int(b["attention_mask"].sum()) for b in group))
            print(f"{side} {name}: step {i + 1} loss {losses[-1]:.4f} {times[-1]:.2f}s "
                  f"{useful[-1]} useful tokens{' (warm-up)' if i < s.warmup else ''}", flush=True)
        timed, tokens = times[s.warmup:], useful[s.warmup:]
        steps_per_s = len(timed) / sum(timed)
        rows = s.epoch_rows or len(d["examples"])
        epoch_steps = math.ceil(math.ceil(per_epoch * rows / len(d["examples"])) / s.grad_accum)
        result["datasets"][name] = dict(
            lengths=percentiles(d["examples"]), dropped=d["dropped"], step_times_s=times, losses=losses,
            useful_tokens_per_s=sum(tokens) / sum(timed), steps_per_s=steps_per_s,
            epoch_rows=rows, epoch_steps=epoch_steps, epoch_s=epoch_steps / steps_per_s,
            median_step_s=statistics.median(timed))
    if cuda:
        result["peak_allocated"] = torch.cuda.max_memory_allocated(device)
    return result


# ----------------------------------------------------------------------------- the parent: a table

def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds:.0f} s"


def print_table(results: dict, device_name: str) -> None:
    lengths = next((r["datasets"] for r in results.values() if "datasets" in r), {})
    for name, d in lengths.items():
        L = d["lengths"]
        print(f"{name}: {L['rows']} rows, tokens p10/p50/p90 = {L['p10']}/{L['p50']}/{L['p90']}, "
              f"mean {L['mean']}, max {L['max']} ({d['dropped']} longer than sequence_len dropped)")
    print(f"\nseed job, one epoch ({device_name})")
    print("| side | data | useful tokens/s | optimizer steps/s | epoch (steps) | peak memory |")
    print("| --- | --- | --- | --- | --- | --- |")
    for side, r in results.items():
        if "datasets" not in r:
            print(f"| {side} | - | {r.get('error') or r.get('skipped')} | | | |")
            continue
        for name, d in r["datasets"].items():
            print(f"| {side} | {name} | {d['useful_tokens_per_s']:,.0f} | {d['steps_per_s']:.3f} | "
                  f"{hours(d['epoch_s'])} ({d['epoch_steps']}) | {size(r.get('peak_allocated'))} |")
    for name in lengths:
        rate = lambda side: results.get(side, {}).get("datasets", {}).get(name, {}).get("useful_tokens_per_s")  # noqa: E731
        c, a = rate("ours_packed"), rate("hf")
        best_unsloth = max([x for x in (rate("unsloth"), rate("unsloth_packed")) if x] or [None], key=lambda x: x or 0)
        parts = []
        if c and a:
            parts.append(f"(c)/(a) {c / a:.1f}x (goal >= {GOALS.get(name, 0):g}x)")
        if c and best_unsloth:
            parts.append(f"(c)/Unsloth's best {c / best_unsloth:.2f}x (goal > 1)")
        if parts:
            print(f"{name}: " + ", ".join(parts))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="test-size model and rows (CPU smoke test)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sides", help=f"comma-separated of {','.join(SIDES)} (default: all; --tiny: ours ones)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per dataset")
    parser.add_argument("--warmup", type=int, help="untimed optimizer steps per dataset")
    parser.add_argument("--format", help="dataset type the rows are tokenized in (default context_qa)")
    parser.add_argument("--epoch_rows", type=int, help="project an epoch of this many rows")
    parser.add_argument("--data", help=f"folder with llama2-tokenizer.model and spider_dev.jsonl (default {SHARED_DATA})")
    parser.add_argument("--unsloth_path", help="where Unsloth was pip-installed with --target (its sides only)")
    parser.add_argument("--json", help="write the results here (default out/bench/seed_job.json)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)      # a child process
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = pick_device(args.device)

    if args.side:
        s = Settings(**json.loads(args.settings))
        Path(args.json).write_text(json.dumps(run_side(args.side, s, device), indent=2))
        return 0

    s = Settings(**(TINY if args.tiny else {}))
    for key in ("steps", "warmup", "format", "epoch_rows", "data"):
        if getattr(args, key) is not None:
            s = replace(s, **{key: getattr(args, key)})
    prepare_checkpoint(s.checkpoint, args.tiny)
    sides = args.sides.split(",") if args.sides else \
        (["ours", "ours_packed"] if device.type != "cuda" else list(SIDES))
    results = {}
    for side in sides:
        if side not in SIDES:
            raise SystemExit(f"error: unknown side {side!r}: use {', '.join(SIDES)}")
        if side in ("hf", "unsloth", "unsloth_packed") and device.type != "cuda":
            results[side] = {"side": side, "skipped": "needs CUDA (bitsandbytes' and Unsloth's GPU paths)"}
            continue
        env = None
        if side.startswith("unsloth"):
            if not args.unsloth_path:
                results[side] = {"side": side, "skipped": "no --unsloth_path"}
                continue
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [args.unsloth_path, *filter(None, [os.environ.get("PYTHONPATH")])])}
        results[side] = run_side_subprocess("bench.seed_job", side, ["--device", str(device), "--settings",
                                                                     json.dumps(asdict(s))], env=env)
    print_table(results, versions()["device"])
    out = Path(args.json or REPO / "out/bench/seed_job.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": asdict(s), "results": results}, indent=2))
    print(f"details: {out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
