"""The training configuration: one dataclass, filled from a YAML file and the command line.

The YAML file may use the keys of an axolotl config (e.g. the seed's sql.yml) that make sense here;
other keys are reported in one warning and ignored. Contradictory keys are an error.
"""

import argparse
import copy
import dataclasses
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_MODEL = "configs/tiny-llama.json"  # a small randomly initialised Llama, for the demo


def option(default, help: str):
    """A TrainConfig field: its default and the one-line meaning that `train.py --help` prints."""
    if isinstance(default, list):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # model
    base_model: str = option(DEFAULT_MODEL, "HF checkpoint dir or hub id (Llama or Falcon, by its config.json's "
                                            "model_type); or a config.json: a random model (the demo)")
    tokenizer: str = option("", "tokenizer.model or tokenizer.json path; empty: the base model's own, or (demo) "
                                "one trained on the data")
    load_in_4bit: bool = option(True, "store the frozen base in NF4 with double quantization (QLoRA)")
    adapter: str = option("qlora", "qlora (4-bit base) or lora (bf16/fp32 base)")
    # data
    datasets: list = option([{"path": "builtin:sql", "type": "context_qa"}],
                            "rows to train on: [{path, type}]; on the command line PATH or PATH:alpaca")
    val_set_size: float = option(0.05, "held-out rows for eval: a fraction (< 1) or a number of rows (>= 1)")
    sequence_len: int = option(256, "tokens per training sequence; longer rows are cut")
    pad_to_sequence_len: bool = option(False, "pad every batch to sequence_len (fixed shapes)")
    sample_packing: bool = option(False, "pack several rows into one sequence")
    train_on_inputs: bool = option(False, "take the loss on the prompt too, not only on the completion")
    # LoRA (paper eq. 5-6)
    lora_r: int = option(16, "LoRA rank r")
    lora_alpha: float = option(32, "LoRA alpha: the update is scaled by alpha / r")
    lora_dropout: float = option(0.05, "dropout on the adapter's input")
    lora_target_linear: bool = option(True, "adapt all linear layers but lm_head")
    lora_target_modules: list = option([], "or adapt these (Llama: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                           "down_proj; Falcon: query_key_value, dense, dense_h_to_4h, dense_4h_to_h)")
    # optimisation
    optimizer: str = option("paged_adamw_32bit", "paged_adamw_32bit (state in CUDA managed memory) or adamw_torch")
    learning_rate: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    lr_scheduler: str = option("cosine", "cosine (decay to 0 after warm-up) or constant")
    warmup_steps: int = option(10, "optimizer steps of linear warm-up")
    warmup_ratio: float = option(0.0, "if > 0: warm up over this fraction of the steps instead (rounded up)")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this")
    micro_batch_size: int = option(8, "sequences per forward/backward")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    num_epochs: float = option(1.0, "passes over the training rows (when max_steps is 0)")
    max_steps: int = option(120, "optimizer steps to run; 0: run num_epochs")
    bf16: str | bool = option("auto", "bf16 compute: true, false or auto (where the GPU supports it)")
    fp16: bool = option(False, "fp16 compute with loss scaling instead")
    gradient_checkpointing: bool = option(False, "recompute each block's activations in backward (less memory)")
    # bookkeeping
    output_dir: str = option("out/demo", "where metrics, checkpoints and the adapter go")
    logging_steps: int = option(10, "print a line every this many steps")
    eval_steps: int = option(40, "evaluate on the held-out rows every this many steps")
    save_steps: int = option(60, "write a checkpoint every this many steps")
    resume_from_checkpoint: str | bool = option(False, "a checkpoint-N directory, or true for the latest in output_dir")
    seed: int = option(42, "seed of the data order, LoRA init, dropout and (demo) the random base")
    device: str = option("auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")

    @property
    def lora_targets(self) -> list[str] | str:
        return "all-linear" if self.lora_target_linear else list(self.lora_target_modules)


# axolotl keys we read under another name or that mean nothing here but are harmless
ALIASES = {"lr": "learning_rate", "epochs": "num_epochs"}


def _coerce(name: str, value, default):
    """Convert a YAML / command-line value to the type of the field's default, or raise."""
    if value is None:
        return default
    kind = type(default)
    try:
        if name in ("bf16", "resume_from_checkpoint"):
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            return value
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError
            return value
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {name!r}: cannot read {value!r} as {kind.__name__}") from None


def _validate(cfg: TrainConfig) -> TrainConfig:
    def bad(msg):
        raise ValueError(f"config: {msg}")

    if cfg.adapter not in ("qlora", "lora"):
        bad(f"adapter must be 'qlora' or 'lora', got {cfg.adapter!r}")
    if cfg.adapter == "qlora" and not cfg.load_in_4bit:
        bad("adapter 'qlora' needs load_in_4bit: true (or use adapter: lora for a 16-bit base)")
    if cfg.adapter == "lora" and cfg.load_in_4bit:
        bad("adapter 'lora' with load_in_4bit: true is QLoRA: set adapter: qlora")
    if cfg.bf16 is True and cfg.fp16:
        bad("bf16 and fp16 are both true: choose one")
    if cfg.bf16 not in (True, False, "auto"):
        bad(f"bf16 must be true, false or auto, got {cfg.bf16!r}")
    if cfg.lora_target_linear and cfg.lora_target_modules:
        bad("lora_target_linear: true and lora_target_modules both set: choose one")
    if not cfg.lora_target_linear and not cfg.lora_target_modules:
        bad("no LoRA targets: set lora_target_linear: true or list lora_target_modules")
    # Which names are valid depends on the architecture (Llama's q_proj ... down_proj, Falcon's
    # query_key_value ...): train.py checks them against config.json's model before loading weights.
    if cfg.optimizer not in ("paged_adamw_32bit", "adamw_torch"):
        bad(f"optimizer {cfg.optimizer!r} is not supported: use paged_adamw_32bit or adamw_torch")
    if cfg.lr_scheduler not in ("cosine", "constant"):
        bad(f"lr_scheduler {cfg.lr_scheduler!r} is not supported: use cosine or constant")
    for name in ("lora_r", "micro_batch_size", "gradient_accumulation_steps", "sequence_len",
                 "logging_steps", "eval_steps", "save_steps"):
        if getattr(cfg, name) <= 0:
            bad(f"{name} must be > 0, got {getattr(cfg, name)}")
    if cfg.warmup_ratio >= 1:
        bad(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    for name in ("warmup_ratio", "warmup_steps", "max_steps", "weight_decay", "lora_dropout", "val_set_size", "max_grad_norm"):
        if getattr(cfg, name) < 0:
            bad(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.lora_dropout < 1:
        bad(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.learning_rate <= 0:
        bad(f"learning_rate must be > 0, got {cfg.learning_rate}")
    if cfg.max_steps == 0 and cfg.num_epochs <= 0:
        bad("num_epochs must be > 0 when max_steps is 0")
    if not isinstance(cfg.datasets, list) or not cfg.datasets:
        bad("datasets must be a non-empty list of {path, type}")
    for i, d in enumerate(cfg.datasets):
        if not isinstance(d, dict) or "path" not in d:
            bad(f"datasets[{i}] needs a 'path' (and a 'type': context_qa or alpaca)")
    return cfg


def from_dict(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """Fill a TrainConfig from a dict of axolotl-style keys; warn once about unknown keys."""
    cfg = base or TrainConfig()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    updates, unknown = {}, []
    for key, value in values.items():
        key = ALIASES.get(key, key)
        if key not in fields:
            unknown.append(key)
            continue
        updates[key] = _coerce(key, value, getattr(cfg, key))
    if unknown:
        warnings.warn(f"ignoring config keys this trainer does not use: {', '.join(sorted(unknown))}",
                      stacklevel=2)
    return _validate(dataclasses.replace(cfg, **updates))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found: check the --config path")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys, got {type(values).__name__}")
    return values


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """`--config FILE` plus `--key value` for any TrainConfig field (command line wins)."""
    parser = argparse.ArgumentParser(description="QLoRA fine-tuning of a Llama or Falcon model. Every key below can "
                                     "also be set in the --config file; the command line wins.")
    parser.add_argument("--config", help="a YAML file (axolotl-style keys)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        meaning = f"{f.metadata['help']} (default: {getattr(defaults, f.name)!r})"
        parser.add_argument(f"--{f.name}", default=None, metavar="V", help=meaning.replace("%", "%%"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    values = load_yaml(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    if isinstance(values.get("datasets"), str):  # --datasets rows.jsonl or rows.jsonl:alpaca
        path, kind = values["datasets"], "context_qa"
        for known in ("context_qa", "alpaca"):
            if path.endswith(":" + known):
                path, kind = path[: -len(known) - 1], known
        values["datasets"] = [{"path": path, "type": kind}]
    return from_dict(values)
