"""QLoRA fine-tuning of a Llama or Falcon model, top to bottom: parse, load, loop, save.

    python train.py                                     # demo: a small random Llama, built-in SQL data
    python train.py --config configs/tiny-falcon.yml    # demo: a small random Falcon, built-in finance data
    python train.py --config configs/sql.yml            # the seed's job, its axolotl YAML unchanged
                                                        # (Llama-2-7B, know_sql)
    python train.py --config configs/falcon-7b-finance.yml  # the second (Falcon-7B, finance-alpaca)

The architecture comes from the base model's config.json ("model_type": llama or falcon).

Any config key can be given on the command line too (`--learning_rate 1e-4`; with a YAML file that
says strict: true, only keys the file has). The demo's model is randomly initialised: it shows that
every piece runs and the loss falls, nothing more.
"""

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from falcon.load import load_base, model_class
from falcon.model import Falcon
from llama.generate import generate
from llama.load import config_path, is_random_base, model_dir, read_json
from llama.tokenizer import load_tokenizer, train_bpe_tokenizer, train_tokenizer
from qlora import distributed
from qlora.adapter import load_adapter, save_adapter
from qlora.atomic import check_writable_dir, clean_leftovers, write_file
from qlora.checkpoint import (check_resume_config, find_checkpoint, list_checkpoints, load_checkpoint, rng_state,
                              save_checkpoint)
from qlora.checkpointing import compile_blocks, set_checkpointing
from qlora.config import TrainConfig, parse_args
from qlora.errors import run_cli
from qlora import progress
from qlora.event_log import log_record, open_event_log
from qlora.data import (Batches, batches_in_order, fingerprint, load_rows, pad_id_of, prepare_data,
                        prepare_data_cached)
from qlora.lora import apply_lora, check_target_names, lora_layers, share_dropout, trainable_summary
from qlora.loss import causal_lm_loss, label_count
from qlora.metrics import MetricsLog, read_metrics
from qlora.prompts import QA_TYPES, format_row, strip_response_prefix
from qlora.sql_eval import exact_match, runs_on_schema
from qlora.trainer import (accumulate_gradients, load_training_state, make_optimizer, memory_gib, mixed_precision,
                           optimizer_step, pick_device, pick_dtype)


def check_before_loading(cfg: TrainConfig) -> TrainConfig:
    """What can be checked before data and model load (a mistake then costs seconds, and leaves
    nothing written): device, paths, the output dir. Returns the config with local paths made
    absolute (the adapter then names its base model wherever infer.py runs)."""
    pick_dtype(cfg, pick_device(cfg.device))
    check_writable_dir(cfg.output_dir)
    base = Path(cfg.base_model).expanduser()
    if is_random_base(cfg.base_model) and not base.is_file():
        raise FileNotFoundError(f"model config {base} not found: pass a config.json, a checkpoint "
                                "directory or a hub id as --base_model")
    if base.exists():
        cfg = dataclasses.replace(cfg, base_model=str(base.resolve()))
    if cfg.tokenizer:
        if not Path(cfg.tokenizer).expanduser().is_file():
            raise FileNotFoundError(f"tokenizer {cfg.tokenizer} not found: pass --tokenizer PATH/tokenizer.model "
                                    "(or tokenizer.json)")
        cfg = dataclasses.replace(cfg, tokenizer=str(Path(cfg.tokenizer).expanduser().resolve()))
    return cfg


def find_resume(cfg: TrainConfig) -> tuple[Path, dict] | None:
    """Clean up after a killed run, then (checkpoint, manifest) to resume from, its config compared
    with this run's, or None; a fresh run into an output_dir with checkpoints is refused."""
    out = Path(cfg.output_dir)
    with distributed.main_first():                 # rank 0 cleans; then every rank reads the same files
        for line in clean_leftovers(out) if distributed.is_main() else []:
            print(f"note: {out}: {line}", file=sys.stderr)
    resume = find_checkpoint(out, cfg.resume_from_checkpoint)
    if resume is None and list_checkpoints(out):
        raise ValueError(f"output_dir {out} holds the checkpoints of an earlier run "
                         f"({', '.join(p.name for p in list_checkpoints(out))}): add --resume_from_checkpoint true "
                         "to continue it, or choose another --output_dir")
    if resume is not None:
        for line in check_resume_config(resume[1].get("config", {}), vars(cfg)):
            print(line, file=sys.stderr)
    return resume


def check_answers(data, cfg: TrainConfig) -> None:
    """Blank answers teach only the end-of-sequence token: an error when all are, a warning when some are."""
    if data.empty_answers and not cfg.train_on_inputs:
        where = ", ".join(str(d["path"]) for d in cfg.datasets)
        if data.empty_answers == data.rows:
            raise ValueError(f"every answer in {where} is empty: training would learn only the end-of-sequence "
                             "token; fill the answer/output fields (or set train_on_inputs: true)")
        print(f"warning: {data.empty_answers} of the {data.rows} rows in {where} have an empty answer: they "
              "teach only the end-of-sequence token", file=sys.stderr)


def check_special_tokens(special: dict, tokenizer) -> None:
    """special_tokens must be the tokenizer's own (adding tokens, which axolotl can, is not supported)."""
    own = tokenizer.special_tokens()
    for key, token in special.items():
        if own[key] != token:
            raise ValueError(f"special_tokens {key}: {token!r} is not this tokenizer's ({own[key] or 'none'!r}); "
                             "adding tokens is not supported: remove the key or use the matching tokenizer")


def due(step: int, every: int, steps_per_epoch: int, total_steps: int) -> bool:
    """Evaluate / save now? every N steps; every 0: at each epoch's end (HF's "epoch" strategy); and last."""
    return step == total_steps or step % (every or steps_per_epoch) == 0


@contextmanager
def deferred_interrupt():
    """Hold a Ctrl-C that arrives inside the block (an optimizer update, a checkpoint write) until the
    block is done, so the weights, the step number and the data position never disagree."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def main(argv=None) -> int:
    cfg = parse_args(argv)
    distributed.init(cfg)                          # under torchrun: join the other ranks (else nothing)
    cfg = check_before_loading(distributed.check_batch_size(cfg))
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg, device)
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    print(f"device {device}, compute dtype {dtype}, output {out}")
    if distributed.world_size() > 1 or cfg.batch_size:      # the global batch: micro-batch x GA x ranks
        ranks = distributed.world_size()
        print(f"{ranks} rank(s){f' ({cfg.distributed})' if ranks > 1 else ''}: {cfg.micro_batch_size} x "
              f"{cfg.gradient_accumulation_steps} x {ranks} rows per step")
    if cfg.fp16 and device.type != "cuda":
        print("note: fp16: true has no effect on the CPU, which computes in fp32")

    # ---- the architecture (config.json's model_type), checked against the LoRA targets before loading
    hf_config = read_json(config_path(cfg.base_model))     # a hub id is downloaded here
    architecture = model_class(hf_config)
    check_target_names(cfg.lora_targets, architecture.LINEAR_NAMES)
    resume = find_resume(cfg)

    # ---- tokenizer and data
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    elif is_random_base(cfg.base_model):  # the demo model has no tokenizer: train one on the dataset (once, kept in output_dir)
        with distributed.main_first():    # rank 0 trains it, the others then read it
            texts = []
            for spec in cfg.datasets:
                rows = load_rows(spec["path"], spec.get("data_files"), spec.get("train_on_split"))
                texts += ["".join(format_row(r, spec.get("type", "context_qa"))) for r in rows]
            if architecture is Falcon:        # Falcon's kind: a byte-level BPE tokenizer.json
                if not (out / "tokenizer.json").is_file():
                    train_bpe_tokenizer(texts, hf_config["vocab_size"], out)
                tokenizer = load_tokenizer(out / "tokenizer.json")
            else:                             # Llama's: sentencepiece
                if not (out / "tokenizer.model").is_file():
                    train_tokenizer(texts, hf_config["vocab_size"], out / "tokenizer.model")
                tokenizer = load_tokenizer(out / "tokenizer.model")
    else:
        tokenizer = load_tokenizer(model_dir(cfg.base_model))
    if tokenizer.vocab_size > hf_config["vocab_size"]:
        which = cfg.tokenizer or f"in {out}"
        raise ValueError(f"the tokenizer {which} has {tokenizer.vocab_size} ids but the model {cfg.base_model} only "
                         f"{hf_config['vocab_size']}: pass the --tokenizer that belongs to the base model")
    check_special_tokens(cfg.special_tokens, tokenizer)
    # Saved beside every adapter (PEFT ignores them): what infer.py needs to rebuild the prompt
    # format, the tokenizer and (for the demo) the random base.
    tokenizer_files = tokenizer.files()
    adapter_extras = {"training_config.json": json.dumps(vars(cfg), indent=2).encode(), **tokenizer_files}
    key = fingerprint(cfg.datasets, tokenizer=b"".join(tokenizer_files[k] for k in sorted(tokenizer_files)),
                      sequence_len=cfg.sequence_len, val_set_size=cfg.val_set_size, seed=cfg.seed,
                      train_on_inputs=cfg.train_on_inputs, sample_packing=cfg.sample_packing) \
        if cfg.dataset_prepared_path else ""
    with distributed.main_first():                 # rank 0 writes the cache, the others read it
        data, origin = prepare_data_cached(cfg.dataset_prepared_path, key, lambda: prepare_data(
            cfg.datasets, tokenizer, cfg.sequence_len, cfg.val_set_size, cfg.seed, cfg.train_on_inputs,
            cfg.sample_packing))
    print(f"{data.summary()} ({origin})")
    check_answers(data, cfg)
    if data.dropped:
        print(f"note: {data.dropped} rows longer than sequence_len {cfg.sequence_len} were left out, as axolotl does")
    pad_id, pad_to = pad_id_of(tokenizer), (cfg.sequence_len if cfg.pad_to_sequence_len else None)
    batches = Batches(data.train, cfg.micro_batch_size, cfg.seed, pad_id, pad_to, group_by_length=cfg.group_by_length)
    batches = distributed.shard_batches(batches)   # several ranks: this rank's micro-batches of the one stream

    # ---- model: frozen (4-bit) base + LoRA adapters
    t0 = time.time()
    fsdp = cfg.distributed == "fsdp" and distributed.launched()   # then each rank quantizes only its rows
    model = load_base(cfg.base_model, device, dtype, cfg.load_in_4bit, cfg.seed,
                      quantize=distributed.shard_quantizer if fsdp else None,
                      place_stored=distributed.shard_stored if fsdp else None)
    print(f"base model loaded in {time.time() - t0:.1f}s ({'NF4' if cfg.load_in_4bit else dtype} weights)")
    set_checkpointing(model, cfg.gradient_checkpointing, cfg.recompute, cfg.embeddings_on_host)
    if cfg.lora_model_dir:   # continue training an adapter (its own r, alpha and targets), as axolotl
        load_adapter(model, cfg.lora_model_dir, dtype=torch.float32)
        for layer in lora_layers(model).values():
            layer.lora_a.requires_grad_(True), layer.lora_b.requires_grad_(True)
        print(f"adapter loaded from {cfg.lora_model_dir}")
    else:
        apply_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, verbose=False)
    print(trainable_summary(model))
    share_dropout(model, cfg.lora_shared_dropout)
    if cfg.torch_compile:                               # after the adapters: the compiled blocks hold them
        print(f"torch_compile: {compile_blocks(model)} blocks compile on the first step")
    step_model = distributed.wrap(model, cfg, device)   # the model itself; under torchrun DDP, or FSDP2 shards
    if distributed.world_size() > 1:
        print("\n".join(distributed.memory_report(model, device)))
    params = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = max(1, math.ceil(len(batches) / (cfg.gradient_accumulation_steps * distributed.world_size())))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * steps_per_epoch))
    optimizer, scheduler = make_optimizer(params, cfg, total_steps)
    autocast, scaler = mixed_precision(device, dtype)

    # ---- resume
    step, best = 0, {"eval_loss": math.inf, "evals_since": 0}
    if resume is not None:   # found, and its config compared, before loading (find_resume)
        state = load_checkpoint(resume[0], model)
        state["optimizer"] = distributed.local_optimizer_state(state["optimizer"], optimizer)
        load_training_state(optimizer, scheduler, scaler, state, cfg, total_steps)
        for line in distributed.resume_notes(state, cfg):
            print(line)
        batches.load_state_dict(state["data"])
        step, best = state["step"], state.get("best", best)
        print(f"resumed from {resume[0]} at step {step}")

    def loss_of(batch, num_items: int):
        input_ids = batch["input_ids"].to(device)
        packed = {k: batch[k].to(device) for k in ("position_ids", "segment_ids") if k in batch}  # sample_packing
        with autocast:
            hidden = step_model(input_ids, return_hidden=True, **packed)       # (B, T, C)
            return causal_lm_loss(hidden, model.lm_head.weight, batch["labels"].to(device), num_items=num_items)

    @torch.no_grad()
    def evaluate() -> float:
        """Token-weighted like training: all val token losses summed / all val label tokens (the
        batches dealt out over the ranks)."""
        model.eval()
        val = list(batches_in_order(data.val, cfg.micro_batch_size, pad_id, pad_to))
        num_items = sum(label_count(b["labels"]) for b in val)
        mine = distributed.my_share(val)
        # Every rank runs a forward for each of its items, counted or not: under FSDP2 a forward is a
        # collective (a rank that skipped the repeated last batch left the others waiting for ever).
        loss = sum(loss_of(b, num_items).item() * counted
                   for b, counted in progress.bar(mine, len(mine), "eval", "batch", leave=False))
        model.train()
        return distributed.all_sum([loss])[0]

    def save(at: dict) -> Path:
        # Every rank joins the gathering (FSDP2 shards; each rank's RNG); rank 0 writes, the others wait.
        trainable, optimizer_state = distributed.whole_trainable(model), distributed.whole_optimizer_state(optimizer)
        trainer_state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), "data": at["data"], "rng": at["rng"],
                         "rng_of_ranks": distributed.gather_objects(at["rng"]),
                         "world_size": distributed.world_size(), "best": at["best"], "config": vars(cfg)}
        path = out / f"checkpoint-{at['step']}"
        if distributed.is_main():
            with deferred_interrupt():
                path = save_checkpoint(out, at["step"], model,
                                       lambda d: save_adapter(model, d, cfg.base_model, overwrite=True,
                                                              extra_files=adapter_extras, values=trainable),
                                       trainer_state, trainable=trainable)
            progress.write(f"saved {path}")
        distributed.barrier()
        return path

    # ---- the loop
    # metrics.jsonl: one line per step; on resume, drop the lines of steps that will run again
    main_rank = distributed.is_main()              # the one that writes metrics
    metrics = MetricsLog(out / "metrics.jsonl", step if resume is not None else None) if main_rank else None
    events = open_event_log(out, step if resume is not None else None) if main_rank else None  # TensorBoard
    model.train()
    last_saved = resume[0] if resume is not None else None
    tokens_seen, t_log = 0, time.time()
    # What a Ctrl-C saves: always one consistent state. During a step's forward/backward passes it is
    # the state at the step's start (its gradients are dropped); from the optimizer update on (held
    # until complete), the state after the step, whatever runs next (eval, logging, a save).
    resume_point = {"step": step, "data": batches.state_dict(), "rng": rng_state(), "best": dict(best)}
    record = None
    bar = progress.bar(total=total_steps, initial=step, desc="training", unit="step")
    try:
        while step < total_steps:
            micro_batches = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
            # token-weighted over the whole step: the label tokens of every rank's micro-batches
            num_items = int(distributed.all_sum([sum(label_count(b["labels"]) for b in micro_batches)])[0])
            loss_avg = accumulate_gradients(micro_batches, loss_of, lambda loss: scaler.scale(loss).backward(),
                                            num_items, distributed.no_sync(step_model))
            tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
            loss_avg, tokens = distributed.all_sum([loss_avg, tokens])      # the step's, all ranks together
            tokens_seen += int(tokens)
            if not math.isfinite(loss_avg):
                where = f"; the last good checkpoint is {last_saved}" if last_saved else ""
                print(f"error: loss is {loss_avg} at step {step + 1}: stopping without saving{where}. "
                      "Lower learning_rate or check the data.", file=sys.stderr)
                return 1
            with deferred_interrupt():
                grad_norm, lr = optimizer_step(optimizer, scaler, scheduler, params, cfg.max_grad_norm)
                step += 1
                record = {"step": step, "loss": loss_avg, "lr": lr, "grad_norm": grad_norm,
                          "epoch": round(batches.epochs_done, 4)}
                resume_point = {"step": step, "data": batches.state_dict(), "rng": rng_state(), "best": dict(best)}
            bar.update()
            bar.set_postfix(loss=f"{loss_avg:.4f}", tok_s=f"{tokens_seen / max(time.time() - t_log, 1e-9):.0f}",
                            mem=f"{memory_gib(device):.2f}GiB", refresh=False)

            stop = False
            if due(step, cfg.eval_steps, steps_per_epoch, total_steps) and data.val:
                record["eval_loss"] = evaluate()
                if cfg.eval_table_size and data.val_rows and distributed.is_main():
                    record["eval_table"] = eval_table(model, tokenizer, data.val_rows[:cfg.eval_table_size], device,
                                                      cfg.sequence_len)
                if record["eval_loss"] < best["eval_loss"]:
                    best = {"eval_loss": record["eval_loss"], "evals_since": 0}
                else:
                    best = {**best, "evals_since": best["evals_since"] + 1}
                resume_point["best"] = dict(best)
                stop = bool(cfg.early_stopping_patience) and best["evals_since"] >= cfg.early_stopping_patience
            if step % cfg.logging_steps == 0 or "eval_loss" in record or step == total_steps or stop:
                elapsed = time.time() - t_log
                record.update(tokens_per_s=round(tokens_seen / elapsed, 1), mem_gib=round(memory_gib(device), 2))
                tokens_seen, t_log = 0, time.time()
                evals = f" eval {record['eval_loss']:.4f}" if "eval_loss" in record else ""
                progress.write(f"step {step:5d}/{total_steps} loss {loss_avg:.4f}{evals} lr {lr:.2e} "
                               f"{record['tokens_per_s']:.0f} tok/s mem {record['mem_gib']:.2f} GiB")
            if metrics:
                metrics.append(record)
            log_record(events, record)
            record = None
            if stop:
                progress.write(f"early stopping: eval_loss has not improved for {best['evals_since']} evals "
                      f"(early_stopping_patience {cfg.early_stopping_patience})")
                last_saved = save(resume_point)
                break
            if due(step, cfg.save_steps, steps_per_epoch, total_steps):
                last_saved = save(resume_point)
    except KeyboardInterrupt:
        if distributed.world_size() > 1:   # the ranks stop at different points: no gathering now
            print(f"\ninterrupted: stopping without a new checkpoint (the last: {last_saved or 'none yet'})",
                  file=sys.stderr)
            return 130
        print("\ninterrupted: saving a checkpoint", file=sys.stderr)
        if record is not None and record["step"] == resume_point["step"]:
            metrics.append(record)                       # the finished step's line (its eval was cut short)
        optimizer.zero_grad(set_to_none=True)            # the unfinished step's gradients, if any
        save(resume_point)
        return 130
    finally:
        bar.close()
        if metrics:
            metrics.close()
        if events is not None:
            events.close()
    trainable = distributed.whole_trainable(model)
    if distributed.is_main():
        adapter_dir = save_adapter(model, out / "adapter", cfg.base_model, overwrite=True, extra_files=adapter_extras,
                                   values=trainable)
        print(f"done: adapter in {adapter_dir}")
        plot_loss(out)
    distributed.barrier()
    return 0


@torch.no_grad()
def eval_table(model, tokenizer, rows: list[tuple[dict, str]], device, sequence_len: int,
               max_new_tokens: int = 128) -> list[dict]:
    """axolotl's eval_table_size: greedy answers for a few val rows, printed as a table and returned
    for metrics.jsonl; for SQL rows (with a CREATE TABLE context) also whether the answer runs."""
    model.eval()
    table = []
    for row, kind in rows:
        prompt, gold = format_row(row, kind)
        ids = tokenizer.encode(prompt, bos=True, eos=False)
        n_new = max(1, min(max_new_tokens, sequence_len - len(ids)))
        generated = tokenizer.decode(generate(model, [ids], n_new, eos_id=tokenizer.eos_id)[0]).strip()
        entry = {"gold": gold, "generated": generated}
        if kind in QA_TYPES and "context" in row and "CREATE TABLE" in row["context"].upper():
            answer = strip_response_prefix(generated, kind)
            entry["exact"] = exact_match(answer, row["answer"])
            try:
                entry["runs"] = runs_on_schema(answer, row["context"])
            except ValueError:                             # a context sqlite cannot read
                entry["runs"] = None
        table.append(entry)
    model.train()
    print("| gold | generated | exact | runs |\n| --- | --- | --- | --- |")
    for e in table:
        cell = lambda t: t.replace("|", "\\|").replace("\n", " ")[:80]  # noqa: E731
        print(f"| {cell(e['gold'])} | {cell(e['generated'])} | {e.get('exact', '')} | {e.get('runs', '')} |")
    return table


def plot_loss(out: Path) -> Path | None:
    """loss.png from metrics.jsonl: train and eval loss against the step, the learning rate on a
    second axis (warm-up and decay explain the curve's bends). Written atomically."""
    try:
        import matplotlib
        matplotlib.use("Agg")                                # no display needed
        import matplotlib.pyplot as plt
    except ImportError:                                      # a dependency, but an old environment may lack it
        print("note: matplotlib is not installed, no loss.png (pip install matplotlib)")
        return None
    rows = read_metrics(out / "metrics.jsonl")
    evals = [r for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step"), ax.set_ylabel("loss")
    lr_ax = ax.twinx()
    lr_ax.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="gray", ls="--", lw=1,
               label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lines = ax.get_lines() + lr_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    fig.tight_layout()
    path = write_file(out / "loss.png", lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    print(f"loss curve in {path}")
    return path


if __name__ == "__main__":
    status = run_cli(main)    # a user's mistake: one line `error: ...`, status 1 (--debug: the traceback)
    distributed.finish()      # under torchrun: the ranks leave the process group together
    sys.exit(status)
