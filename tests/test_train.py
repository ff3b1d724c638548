"""train.py end to end on a tiny random Llama (CPU): the loss falls, resume is exact, checkpoints are
atomic, bad input fails cleanly. References: the uninterrupted run's own loss curve, torch.load."""

import json
from pathlib import Path

import pytest
import torch

import train
from qlora import checkpoint as ckpt
from llama.tokenizer import train_tokenizer
from qlora.data import Batches, format_row
from qlora.sql_dataset import sql_rows, write_jsonl

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    rows = sql_rows(160, seed=1)
    write_jsonl(rows, root / "rows.jsonl")
    (root / "tiny.json").write_text(json.dumps(TINY))
    train_tokenizer(["".join(format_row(r, "context_qa")) for r in rows], 512, root / "tok.model")
    return root


def args(setup: Path, out: Path, **extra) -> list[str]:
    values = {"base_model": setup / "tiny.json", "tokenizer": setup / "tok.model",
              "datasets": setup / "rows.jsonl", "output_dir": out, "sequence_len": 256,
              "micro_batch_size": 4, "max_steps": 8, "warmup_steps": 2, "learning_rate": 3e-3,
              "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "eval_steps": 4, "save_steps": 4,
              "logging_steps": 1, "val_set_size": 8, "gradient_accumulation_steps": 2}
    values.update(extra)
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_decreases_and_the_adapter_is_written(setup, tmp_path):
    assert train.main(args(setup, tmp_path, max_steps=24, eval_steps=12, save_steps=12)) == 0
    curve = losses(tmp_path)
    assert len(curve) == 24
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.3, curve
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-12", "checkpoint-24"]


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(setup, tmp_path, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main(args(setup, whole)) == 0

    # Ctrl-C during step 6 (its 11th micro-batch): the checkpoint holds the state before step 6.
    calls, real_next = {"n": 0}, Batches.__next__

    def interrupting_next(self):
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(Batches, "__next__", interrupting_next)
    assert train.main(args(setup, parts)) == 130
    assert ckpt.list_checkpoints(parts)[-1].name == "checkpoint-5"
    monkeypatch.setattr(Batches, "__next__", real_next)
    assert train.main(args(setup, parts, resume_from_checkpoint="true")) == 0
    assert losses(parts) == losses(whole)                    # bit for bit, step by step


def test_a_crash_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    model = torch.nn.Linear(3, 2)
    first = ckpt.save_checkpoint(tmp_path, 1, model, lambda d: None, {"data": {"epoch": 0}})

    def crash(directory):
        (directory / "half-written").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, model, crash, {"data": {"epoch": 1}})
    assert ckpt.find_checkpoint(tmp_path, True) == first
    state = ckpt.load_checkpoint(first, model)
    assert state["step"] == 1 and state["data"] == {"epoch": 0}


def test_bad_input_fails_with_a_clear_message(setup, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        train.main(args(setup, tmp_path, datasets=tmp_path / "nope.jsonl"))
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"context": "CREATE TABLE t (a INT)", "question": "q?"}\n')
    with pytest.raises(ValueError, match="answer"):
        train.main(args(setup, tmp_path, datasets=bad_rows))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty|no rows"):
        train.main(args(setup, tmp_path, datasets=empty))
    with pytest.raises(ValueError, match="sequence_len"):
        train.main(args(setup, tmp_path, sequence_len=8))
    with pytest.raises(ValueError, match="lora_r"):
        train.main(args(setup, tmp_path, lora_r=-1))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    real_loss = train.causal_lm_loss
    calls = {"n": 0}

    def loss_turning_nan(*a, **k):
        calls["n"] += 1
        value = real_loss(*a, **k)
        return value * float("nan") if calls["n"] > 9 else value   # after 4 steps of 2 micro-batches

    monkeypatch.setattr(train, "causal_lm_loss", loss_turning_nan)
    assert train.main(args(setup, tmp_path)) == 1
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-4"]
