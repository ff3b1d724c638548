"""The training config: YAML (axolotl keys, the seed's file), command line, bad values."""

from pathlib import Path

import pytest

from qlora.config import TrainConfig, from_dict, load_yaml, parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_seed_config_parses_with_one_warning_naming_the_ignored_keys():
    """configs/sql.yml is the seed's axolotl file, verbatim; every key it sets is honoured or named."""
    with pytest.warns(UserWarning) as record:
        cfg = parse_args(["--config", str(ROOT / "configs/sql.yml")])
    assert len(record) == 1
    message = str(record[0].message)
    for key in ("base_model_config", "model_type", "tokenizer_type", "is_llama_derived_model", "flash_attention"):
        assert key in message
    for key in ("wandb_project", "save_steps", "lora_model_dir", "deepspeed"):   # empty: nothing to ignore
        assert key not in message
    assert cfg.base_model == "meta-llama/Llama-2-7b-hf"
    assert cfg.datasets == [{"path": "knowrohit07/know_sql", "type": "context_qa.load_v2",
                             "train_on_split": "validation"}]
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (32, 16.0, 0.05)
    assert cfg.lora_targets == "all-linear"
    assert (cfg.micro_batch_size, cfg.gradient_accumulation_steps, cfg.sequence_len) == (2, 4, 2048)
    assert cfg.optimizer == "paged_adamw_32bit" and cfg.learning_rate == 2e-4
    assert cfg.gradient_checkpointing and cfg.load_in_4bit and cfg.adapter == "qlora"
    assert cfg.resume_from_checkpoint is False            # empty key keeps the default
    # axolotl's defaults for what the file leaves out or empty: num_epochs decides, save per epoch
    assert (cfg.max_steps, cfg.num_epochs, cfg.save_steps, cfg.eval_steps) == (0, 1.0, 0, 20)
    assert (cfg.fp16, cfg.bf16, cfg.tf32, cfg.val_set_size, cfg.eval_table_size) == (True, False, False, 0.01, 5)
    assert cfg.dataset_prepared_path == "last_run_prepared" and cfg.pad_to_sequence_len and not cfg.sample_packing
    assert cfg.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert cfg.strict is False and cfg.warmup_steps == 10 and cfg.logging_steps == 1


def test_falcon_configs_parse_with_every_key_known():
    """configs/tiny-falcon.yml (strict, no warning) and configs/falcon-7b-finance.yml (strict: false;
    only the informational model_type / tokenizer_type named as ignored); warmup_ratio is read."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny = parse_args(["--config", str(ROOT / "configs/tiny-falcon.yml")])
    assert tiny.strict and tiny.warmup_ratio == 0.03 and tiny.lr_scheduler == "constant"
    assert tiny.lora_targets == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    with pytest.warns(UserWarning) as record:
        cfg = parse_args(["--config", str(ROOT / "configs/falcon-7b-finance.yml")])
    assert len(record) == 1 and "model_type, tokenizer_type" in str(record[0].message)
    assert (cfg.warmup_ratio, cfg.max_steps, cfg.fp16, cfg.bf16, cfg.lora_r) == (0.03, 500, True, False, 64)


def test_unknown_key_is_an_error_with_a_suggestion_unless_strict_false(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("lerning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown key 'lerning_rate' \(did you mean 'learning_rate'\?\)"):
        parse_args(["--config", str(path)])
    path.write_text("strict: false\nlerning_rate: 0.1\n")
    with pytest.warns(UserWarning, match=r"'lerning_rate' \(did you mean 'learning_rate'\?\): ignored"):
        cfg = parse_args(["--config", str(path)])
    assert cfg.learning_rate == TrainConfig().learning_rate
    path.write_text("datasets:\n  - path: rows.jsonl\n    typ: alpaca\n")
    with pytest.raises(ValueError, match=r"datasets\[0\]: unknown key 'typ' \(did you mean 'type'\?\)"):
        parse_args(["--config", str(path)])


def test_strict_limits_the_command_line_to_the_files_keys(tmp_path):
    """axolotl's strict: with it, --key must override a key of the file; strict: false may add keys."""
    path = tmp_path / "c.yml"
    path.write_text("lora_r: 8\n")
    assert parse_args(["--config", str(path), "--lora_r", "4"]).lora_r == 4
    with pytest.raises(ValueError, match="--max_steps is not a key of .*strict: false"):
        parse_args(["--config", str(path), "--max_steps", "3"])
    path.write_text("lora_r: 8\nstrict: false\n")
    assert parse_args(["--config", str(path), "--max_steps", "3"]).max_steps == 3


@pytest.mark.parametrize("values, match", [
    ({"load_in_8bit": True}, "8-bit"), ({"deepspeed": "ds.json"}, "DeepSpeed"), ({"fsdp": ["full_shard"]}, "FSDP"),
    ({"lora_fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"datasets": [{"path": "x", "type": "sharegpt"}]}, "unknown dataset type 'sharegpt'"),
    ({"special_tokens": {"sep_token": "<sep>"}}, "sep_token"),
])
def test_axolotl_keys_that_would_train_something_else_are_refused(values, match):
    with pytest.raises(ValueError, match=match):
        from_dict(values)


def test_command_line_overrides_yaml(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("learning_rate: 0.001\nlora_r: 8\nlora_target_linear: false\n"
                    "lora_target_modules: [q_proj, v_proj]\n")
    cfg = parse_args(["--config", str(path), "--lora_r", "4", "--strict", "false", "--datasets", "rows.jsonl:alpaca"])
    assert cfg.lora_r == 4 and cfg.learning_rate == 1e-3
    assert cfg.lora_targets == ["q_proj", "v_proj"]
    assert cfg.datasets == [{"path": "rows.jsonl", "type": "alpaca"}]


def test_defaults_are_valid():
    assert from_dict({}) == TrainConfig()


@pytest.mark.parametrize("values, match", [
    ({"bf16": True, "fp16": True}, "both true"),
    ({"adapter": "qlora", "load_in_4bit": False}, "load_in_4bit"),
    ({"adapter": "lora", "load_in_4bit": True}, "QLoRA"),
    ({"lora_target_modules": ["q_proj"]}, "choose one"),
    ({"lora_r": 0}, "lora_r must be > 0"),
    ({"learning_rate": -1}, "learning_rate"),
    ({"micro_batch_size": "two"}, "micro_batch_size"),
    ({"sequence_len": 1.5}, "sequence_len"),
    ({"gradient_checkpointing": "maybe"}, "gradient_checkpointing"),
    ({"optimizer": "sgd"}, "optimizer"),
    ({"lr_scheduler": "linear"}, "lr_scheduler"),
    ({"datasets": []}, "datasets"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
])
def test_bad_values_raise_one_line_errors(values, match):
    with pytest.raises(ValueError, match=match) as e:
        from_dict(values)
    assert "\n" not in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_yaml(tmp_path / "nope.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("lora_r: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_yaml(bad)
    listy = tmp_path / "list.yml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_yaml(listy)


def test_help_lists_every_key_with_its_default_and_meaning(capsys):
    import dataclasses

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())          # argparse wraps long lines
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"] and f"--{f.name} V {' '.join(f.metadata['help'].split())}" in out, f.name
    assert out.count("(default: ") == len(dataclasses.fields(TrainConfig))
