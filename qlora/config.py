"""The training configuration: one dataclass, filled from a YAML file and the command line.

An axolotl YAML (the seed's configs/sql.yml) runs as it is. Each key is either
* honoured as axolotl honours it (a TrainConfig field below, or an ALIASES name of one);
* known to axolotl but without effect here (AXOLOTL_IGNORED: why, for each) - all such keys that
  the file sets are named in one warning;
* known to axolotl and not supported here with the value given (AXOLOTL_REFUSED: deepspeed,
  fsdp, 8-bit loading, ...) - an error, since ignoring it would train something else;
* unknown (a typo such as lerning_rate): an error naming the key and the nearest known one, or
  with `strict: false` a warning.
`strict` means what it means in axolotl too: with strict (our default) a command-line --key must
name a key the YAML file has; `strict: false` lets the command line add any key.

Keys a YAML file leaves out get axolotl's defaults where ours differ (FILE_DEFAULTS: no max_steps
means num_epochs decides; no save_steps / eval_steps means at the end of each epoch). Without a
file the defaults are the demo's (python train.py). Empty keys (`save_steps:`) count as left out.
"""

import argparse
import copy
import dataclasses
import difflib
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qlora.checkpointing import check_settings

DEFAULT_MODEL = "configs/tiny-llama.json"  # a small randomly initialised Llama, for the demo


def option(default, help: str):
    """A TrainConfig field: its default and the one-line meaning that `train.py --help` prints."""
    if isinstance(default, (list, dict)):
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
                            "rows to train on: [{path, type, data_files?, train_on_split?}]; on the command "
                            "line PATH or PATH:TYPE (context_qa, context_qa.load_v2, alpaca, ...)")
    val_set_size: float = option(0.05, "held-out rows for eval: a fraction (< 1) or a number of rows (>= 1)")
    dataset_prepared_path: str = option("", "a folder caching the tokenized dataset, keyed by what made it")
    sequence_len: int = option(256, "tokens per training sequence; longer rows are dropped (as axolotl)")
    pad_to_sequence_len: bool = option(False, "pad every batch to sequence_len (fixed shapes)")
    sample_packing: bool = option(False, "pack rows into sequence_len, kept apart (own positions and attention)")
    group_by_length: bool = option(False, "micro-batches of rows of similar length (less padding)")
    train_on_inputs: bool = option(False, "take the loss on the prompt too, not only on the completion")
    special_tokens: dict = option({}, "bos_token/eos_token/unk_token/pad_token: must be the tokenizer's own")
    # LoRA (paper eq. 5-6)
    lora_r: int = option(16, "LoRA rank r")
    lora_alpha: float = option(32, "LoRA alpha: the update is scaled by alpha / r")
    lora_dropout: float = option(0.05, "dropout on the adapter's input")
    lora_shared_dropout: bool = option(False, "q/k/v and gate/up draw one dropout mask of their shared input and "
                                              "share one LoRA A product (faster, less memory; PEFT draws one "
                                              "mask per layer; with lora_dropout 0 they share it anyway)")
    lora_target_linear: bool = option(True, "adapt all linear layers but lm_head")
    lora_target_modules: list = option([], "or adapt these (Llama: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                           "down_proj; Falcon: query_key_value, dense, dense_h_to_4h, dense_4h_to_h)")
    lora_model_dir: str = option("", "an adapter to continue training (its r, alpha and targets); empty: a new one")
    # optimisation
    optimizer: str = option("paged_adamw_32bit", "paged_adamw_32bit (state in CUDA managed memory) or adamw_torch")
    learning_rate: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    lr_scheduler: str = option("cosine", "cosine (decay to 0 after warm-up) or constant")
    warmup_steps: int = option(10, "optimizer steps of linear warm-up from 0 (as transformers)")
    warmup_ratio: float = option(0.0, "if > 0: warm up over this fraction of the steps instead (rounded up)")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this")
    micro_batch_size: int = option(8, "sequences per forward/backward")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    batch_size: int = option(0, "rows per optimizer step, all ranks together; if set it decides "
                                "gradient_accumulation_steps (= batch_size / (micro_batch_size x ranks))")
    num_epochs: float = option(1.0, "passes over the training rows (when max_steps is 0)")
    max_steps: int = option(120, "optimizer steps to run; 0: run num_epochs (the default with a --config file)")
    bf16: str | bool = option("auto", "bf16 compute: true, false or auto (where the GPU supports it)")
    fp16: bool = option(False, "fp16 compute with loss scaling instead")
    tf32: bool = option(False, "TF32 for fp32 matmuls on CUDA")
    gradient_checkpointing: bool | str = option(False, "recompute each block's activations in backward (less "
                                                        "memory); offload: and keep each block's input in host "
                                                        "memory until its recompute (less still)")
    torch_compile: bool = option(False, "torch.compile each block for training (axolotl's key; one region per block, "
                                        "as Unsloth): fewer launches; the first step compiles")
    embeddings_on_host: bool = option(False, "keep a frozen embedding table that lm_head does not share in pinned "
                                             "host memory, read by the GPU over PCIe for each lookup (-0.24 GiB at "
                                             "7B)")
    recompute: str = option("full", "with gradient_checkpointing, what backward recomputes: full, selective (keep "
                                    "the C-wide frozen products: faster, more memory) or none")
    # bookkeeping
    output_dir: str = option("out/demo", "where metrics, checkpoints and the adapter go")
    logging_steps: int = option(10, "print a line every this many steps")
    eval_steps: int = option(40, "evaluate on the held-out rows every this many steps; 0: each epoch's end")
    eval_table_size: int = option(0, "at each eval, greedy answers for this many held-out rows (table + metrics)")
    early_stopping_patience: int = option(0, "stop after this many evals without a better eval_loss; 0: never")
    save_steps: int = option(60, "write a checkpoint every this many steps; 0: each epoch's end")
    resume_from_checkpoint: str | bool = option(False, "a checkpoint-N directory, or true for the latest in output_dir")
    seed: int = option(42, "seed of the data order, LoRA init, dropout and (demo) the random base")
    device: str = option("auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")
    distributed: str = option("ddp", "under torchrun: ddp (every rank holds the 4-bit model) or fsdp (base and "
                                     "adapters sharded over the ranks)")
    strict: bool = option(True, "unknown keys are errors and --key must be a key of the --config file "
                                "(axolotl's strict); false: warnings, and the command line may add keys")

    @property
    def lora_targets(self) -> list[str] | str:
        return "all-linear" if self.lora_target_linear else list(self.lora_target_modules)


# axolotl keys we read under another name
ALIASES = {"lr": "learning_rate", "epochs": "num_epochs"}
# Defaults of a run from a YAML file where axolotl's differ from the demo's.
FILE_DEFAULTS = {"max_steps": 0, "eval_steps": 0, "save_steps": 0, "val_set_size": 0.0}
_SAME_ARCH = "the architecture and tokenizer come from the checkpoint (config.json, tokenizer.model or tokenizer.json)"
_NO_WANDB = "no Weights & Biases logging here: metrics go to output_dir/metrics.jsonl"
# axolotl keys that change nothing here, and why (named in one warning when a file sets them).
AXOLOTL_IGNORED = {
    "base_model_config": _SAME_ARCH, "model_type": _SAME_ARCH, "tokenizer_type": _SAME_ARCH,
    "is_llama_derived_model": _SAME_ARCH, "trust_remote_code": _SAME_ARCH,
    "flash_attention": "attention is SDPA's flash kernel (FlexAttention for packed rows) anyway",
    "xformers_attention": "attention is SDPA's flash kernel (FlexAttention for packed rows) anyway",
    "sdp_attention": "attention is SDPA anyway",
    "wandb_project": _NO_WANDB, "wandb_entity": _NO_WANDB, "wandb_watch": _NO_WANDB,
    "wandb_run_id": _NO_WANDB, "wandb_log_model": _NO_WANDB, "wandb_name": _NO_WANDB,
    "local_rank": "torchrun sets each rank's GPU (LOCAL_RANK)", "debug": "no debug dump of tokenized rows",
    "dataset_processes": "tokenizing runs in this process",
}
# axolotl keys whose given value this trainer cannot honour: (the values that are fine, the fix).
AXOLOTL_REFUSED = {
    "load_in_8bit": ((False,), "8-bit loading is not supported: use load_in_4bit (QLoRA) or adapter: lora"),
    "lora_fan_in_fan_out": ((False,), "the linear weights are (out, in): leave lora_fan_in_fan_out empty"),
    "deepspeed": ((), "DeepSpeed is not supported: remove deepspeed (torchrun with distributed: ddp or fsdp "
                      "runs on several GPUs)"),
    "fsdp": ((), "axolotl's FSDP options are not read here: remove fsdp and set distributed: fsdp (under torchrun)"),
    "fsdp_config": ((), "axolotl's FSDP options are not read here: remove fsdp_config and set distributed: fsdp "
                        "(under torchrun)"),
}
DATASET_KEYS = ("path", "type", "data_files", "train_on_split")


def _coerce(name: str, value, default):
    """Convert a YAML / command-line value to the type of the field's default, or raise."""
    if value is None:
        return default
    kind = type(default)
    try:
        if name == "gradient_checkpointing":
            if isinstance(value, str) and value.lower() == "offload":
                return "offload"
            kind = bool                                     # else true / false, whatever the default's type
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
        if kind is dict:
            if not isinstance(value, dict):
                raise ValueError
            return value
        if kind is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError
            return value
        return str(value)
    except (TypeError, ValueError):
        if name == "gradient_checkpointing":
            raise ValueError(f"config key {name!r}: cannot read {value!r}: use true, false or offload") from None
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
    try:
        check_settings(cfg.gradient_checkpointing, cfg.recompute)
    except ValueError as e:
        bad(str(e))
    if cfg.torch_compile and cfg.recompute == "selective":
        bad("torch_compile: true with recompute: selective is not supported (forward and recompute run different "
            "compiled graphs, whose saved tensors can come in another order, which checkpointing refuses): use recompute: full or none")
    if cfg.torch_compile and cfg.distributed == "fsdp":
        bad("torch_compile: true with distributed: fsdp is not supported yet: use distributed: ddp, or no torch_compile")
    if cfg.lora_target_linear and cfg.lora_target_modules:
        bad("lora_target_linear: true and lora_target_modules both set: choose one")
    if not cfg.lora_target_linear and not cfg.lora_target_modules:
        bad("no LoRA targets: set lora_target_linear: true or list lora_target_modules")
    # Which names are valid depends on the architecture (Llama's q_proj ... down_proj, Falcon's
    # query_key_value ...): train.py checks them against config.json's model before loading weights.
    if cfg.optimizer not in ("paged_adamw_32bit", "adamw_torch"):
        bad(f"optimizer {cfg.optimizer!r} is not supported: use paged_adamw_32bit or adamw_torch")
    if cfg.distributed not in ("ddp", "fsdp"):
        bad(f"distributed must be ddp or fsdp, got {cfg.distributed!r}")
    if cfg.lr_scheduler not in ("cosine", "constant"):
        bad(f"lr_scheduler {cfg.lr_scheduler!r} is not supported: use cosine or constant")
    for name in ("lora_r", "micro_batch_size", "gradient_accumulation_steps", "sequence_len", "logging_steps"):
        if getattr(cfg, name) <= 0:
            bad(f"{name} must be > 0, got {getattr(cfg, name)}")
    if cfg.warmup_ratio >= 1:
        bad(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    for name in ("warmup_ratio", "warmup_steps", "max_steps", "weight_decay", "lora_dropout", "val_set_size",
                 "max_grad_norm", "eval_steps", "save_steps", "eval_table_size", "early_stopping_patience",
                 "batch_size"):
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
            bad(f"datasets[{i}] needs a 'path' (and a 'type': context_qa, context_qa.load_v2, alpaca, ...)")
        from qlora.prompts import check_type
        check_type(d.get("type", "context_qa"))
    unknown = [k for k in cfg.special_tokens if k not in ("bos_token", "eos_token", "unk_token", "pad_token")]
    if unknown:
        bad(f"special_tokens {unknown} are not supported: only bos_token, eos_token, unk_token, pad_token")
    return check_values(cfg)


def check_values(cfg: TrainConfig) -> TrainConfig:
    """Value checks that would otherwise fire only once data and model are loaded."""
    if not cfg.lora_alpha > 0:   # the LoRA scaling alpha / r (paper eq. 5): 0 trains nothing
        raise ValueError(f"config: lora_alpha must be > 0, got {cfg.lora_alpha} (commonly 2 * lora_r)")
    if cfg.val_set_size >= 1 and cfg.val_set_size != int(cfg.val_set_size):
        raise ValueError(f"config: val_set_size {cfg.val_set_size} >= 1 is a row count and must be whole "
                         "(or a fraction < 1)")
    return cfg


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown(message: str, strict: bool) -> None:
    if strict:
        raise ValueError(f"config: {message}; fix it, or set strict: false to only warn")
    warnings.warn(f"config: {message}: ignored (strict: false)", stacklevel=3)


def from_dict(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """Fill a TrainConfig from a dict of axolotl-style keys (see the top for what each kind of key does)."""
    cfg = base or TrainConfig()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    strict = _coerce("strict", values.get("strict"), cfg.strict)
    known = set(fields) | set(ALIASES) | set(AXOLOTL_IGNORED) | set(AXOLOTL_REFUSED)
    updates, ignored = {}, []
    for key, value in values.items():
        if key in AXOLOTL_REFUSED:
            allowed, fix = AXOLOTL_REFUSED[key]
            if value not in (None, "", *allowed):
                raise ValueError(f"config: {key}: {value!r}: {fix}")
            continue
        if key in AXOLOTL_IGNORED:
            if value not in (None, ""):
                ignored.append(key)
            continue
        name = ALIASES.get(key, key)
        if name not in fields:
            _unknown(f"unknown key {key!r}{_suggest(key, known)}", strict)
            continue
        updates[name] = _coerce(name, value, getattr(cfg, name))
    if ignored:
        reasons = {}
        for key in ignored:
            reasons.setdefault(AXOLOTL_IGNORED[key], []).append(key)
        warnings.warn("ignoring axolotl keys that change nothing here: " +
                      "; ".join(f"{', '.join(keys)} ({why})" for why, keys in reasons.items()), stacklevel=2)
    cfg = dataclasses.replace(cfg, **updates)
    for i, spec in enumerate(cfg.datasets if isinstance(cfg.datasets, list) else []):
        for key in (spec if isinstance(spec, dict) else {}):
            if key not in DATASET_KEYS:
                _unknown(f"datasets[{i}]: unknown key {key!r}{_suggest(key, DATASET_KEYS)}", strict)
        if isinstance(spec, dict) and spec.get("train_on_split") is None:
            spec.pop("train_on_split", None)
    return _validate(cfg)


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
    cli = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    if args.config and _coerce("strict", cli.get("strict", values.get("strict")), True):
        # axolotl's strict: the command line may only override keys the file has
        extra = [k for k in cli if k not in values and k != "strict"]
        if extra:
            raise ValueError(f"config: --{extra[0]} is not a key of {args.config}, which sets strict: true "
                             "(the default): add the key to the file, or set strict: false")
    values.update(cli)
    if isinstance(values.get("datasets"), str):  # --datasets rows.jsonl or rows.jsonl:alpaca
        from qlora.prompts import REQUIRED_FIELDS
        path, kind = values["datasets"], "context_qa"
        for known in sorted(REQUIRED_FIELDS, key=len, reverse=True):
            if path.endswith(":" + known):
                path, kind = path[: -len(known) - 1], known
                break
        values["datasets"] = [{"path": path, "type": kind}]
    base = dataclasses.replace(TrainConfig(), **FILE_DEFAULTS) if args.config else None
    return from_dict(values, base)
