"""train.py end to end on a tiny random Llama (CPU): the loss falls, resume is exact, checkpoints are
atomic, bad input fails cleanly. References: the uninterrupted run's own loss curve, torch.load."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import train
from conftest import write_train_inputs
from qlora import checkpoint as ckpt
from qlora.data import Batches
from qlora.sql_dataset import sql_rows, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_train_inputs(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="module")
def whole_run(setup):
    """The uninterrupted run's loss curve (the reference of every interrupt-and-resume test)."""
    out = setup / "whole"
    assert train.main(args(setup, out)) == 0
    return losses(out)


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


@pytest.mark.parametrize("scheduler", ["cosine", "constant"])
@pytest.mark.parametrize("warmup, ratio", [(5, 0.0), (0, 0.25), (10, 0.03)])
def test_lr_schedule_is_transformers_with_warmup_steps_or_ratio(scheduler, warmup, ratio):
    """qlora.trainer.lr_factor against transformers' get_{cosine,constant}_schedule_with_warmup; a
    warmup_ratio, when set, replaces warmup_steps and is rounded up as TrainingArguments does."""
    import math

    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    from qlora.config import TrainConfig
    from qlora.trainer import lr_factor

    total = 37
    n_warmup = math.ceil(ratio * total) if ratio else warmup
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    hf = (get_cosine_schedule_with_warmup(optimizer, n_warmup, total) if scheduler == "cosine"
          else get_constant_schedule_with_warmup(optimizer, n_warmup))
    want = []
    for _ in range(total):
        want.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        hf.step()
    cfg = TrainConfig(lr_scheduler=scheduler, warmup_steps=warmup, warmup_ratio=ratio)
    assert [lr_factor(step, cfg, total) for step in range(total)] == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_loss_decreases_and_the_adapter_is_written(setup, tmp_path):
    assert train.main(args(setup, tmp_path, max_steps=24, eval_steps=12, save_steps=12)) == 0
    curve = losses(tmp_path)
    assert len(curve) == 24
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.3, curve
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-12", "checkpoint-24"]


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(setup, tmp_path, monkeypatch, whole_run):
    parts = tmp_path / "parts"

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
    assert losses(parts) == whole_run                        # bit for bit, step by step


def test_torch_compile_trains_like_eager(setup, tmp_path, whole_run):
    # torch_compile: true from the command line: the compiled blocks (qlora.checkpointing.compile_blocks)
    # give the eager run's loss curve, evaluation and saving included (dropout 0.1 draws eager's masks
    # with inductor's fallback_random; the rest differs by fp32 rounding only).
    import torch._dynamo
    import torch._inductor.config as inductor_config
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        assert train.main(args(setup, tmp_path, torch_compile="true")) == 0
    assert losses(tmp_path) == pytest.approx(whole_run, rel=1e-4)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_a_crash_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    model = torch.nn.Linear(3, 2)
    first = ckpt.save_checkpoint(tmp_path, 1, model, lambda d: None, {"data": {"epoch": 0}})

    def crash(directory):
        (directory / "half-written").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, model, crash, {"data": {"epoch": 1}})
    assert ckpt.find_checkpoint(tmp_path, True)[0] == first
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


def test_resume_skips_a_damaged_checkpoint_with_a_warning(setup, tmp_path, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main(args(setup, whole)) == 0
    shutil.copytree(whole, parts)
    state = parts / "checkpoint-8" / ckpt.STATE_FILE
    state.write_bytes(state.read_bytes()[:1000])           # truncated after the save (power loss, a copy)
    (parts / "metrics.jsonl").write_text("".join((whole / "metrics.jsonl").read_text().splitlines(True)[:4]))
    capsys.readouterr()
    assert train.main(args(setup, parts, resume_from_checkpoint="true")) == 0
    err, out = capsys.readouterr()[::-1]
    assert "warning: skipping checkpoint-8" in err and "truncated" in err
    assert f"resumed from {parts / 'checkpoint-4'} at step 4" in out
    assert losses(parts) == losses(whole)


def test_a_changed_learning_rate_is_reported_and_applies_from_the_resumed_step(setup, tmp_path, capsys):
    assert train.main(args(setup, tmp_path)) == 0
    capsys.readouterr()
    assert train.main(args(setup, tmp_path, learning_rate=1e-3,
                           resume_from_checkpoint=tmp_path / "checkpoint-4")) == 0
    err = capsys.readouterr().err
    assert "warning: learning_rate is now 0.001 (the checkpoint's run had 0.003)" in err
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    # step 5 is schedule step 4: warm-up 2, cosine over 6 steps -> 0.5 * (1 + cos(pi / 3)) = 0.75
    assert rows[4]["lr"] == pytest.approx(1e-3 * 0.75, rel=1e-12)


def test_no_validation_set_logs_no_eval_loss(setup, tmp_path, capsys):
    assert train.main(args(setup, tmp_path, val_set_size=0, max_steps=4)) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and not any("eval_loss" in r for r in rows)
    assert " eval " not in capsys.readouterr().out


def test_a_fresh_run_refuses_an_output_dir_with_checkpoints(setup, tmp_path):
    assert train.main(args(setup, tmp_path, max_steps=4)) == 0
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="resume_from_checkpoint true"):
        train.main(args(setup, tmp_path, max_steps=4))
    assert (tmp_path / "metrics.jsonl").read_text() == before


# ----------------------------------------------------------------------------- the seed's sql.yml

def test_the_seeds_sql_yml_runs_to_the_end_from_the_command_line(tmp_path):
    """configs/sql.yml with only base_model (a tiny local checkpoint) and datasets[0].path (a local
    JSONL in know_sql's columns) changed, through `python train.py --config`: one epoch, fp16 note,
    eval table, the prepared-dataset cache, the adapter and an end-of-epoch checkpoint."""
    import shutil
    import subprocess
    import sys

    import yaml

    from conftest import train_tiny_sentencepiece, write_tiny_llama

    base = write_tiny_llama(tmp_path / "base", vocab_size=320, max_position_embeddings=2048)
    shutil.copy(train_tiny_sentencepiece(tmp_path / "tok", 320), base / "tokenizer.model")
    write_jsonl(sql_rows(40, seed=2), tmp_path / "know_sql.jsonl")
    seed_yml = (Path(train.__file__).parent / "configs" / "sql.yml").read_text()
    assert yaml.safe_load(seed_yml)["base_model"] == "meta-llama/Llama-2-7b-hf"
    text = seed_yml.replace("base_model: meta-llama/Llama-2-7b-hf\n", f"base_model: {base}\n", 1) \
                   .replace("  - path: knowrohit07/know_sql\n", f"  - path: {tmp_path / 'know_sql.jsonl'}\n", 1)
    changed = {k for k, v in yaml.safe_load(text).items() if v != yaml.safe_load(seed_yml)[k]}
    assert changed == {"base_model", "datasets"}
    (tmp_path / "sql.yml").write_text(text)

    done = subprocess.run([sys.executable, str(Path(train.__file__)), "--config", "sql.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # 40 rows, val 0.01 -> 1 row; 39 train rows / micro-batch 2 = 20 micro-batches / GA 4 = 5 steps
    assert "step     5/5" in done.stdout and "| gold | generated | exact | runs |" in done.stdout
    assert "fp16: true has no effect on the CPU" in done.stdout
    assert done.stderr.count("ignoring axolotl keys") == 1
    out = tmp_path / "qlora-out"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-5"]   # save_steps empty: per epoch
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[0]["lr"] == 0.0   # HF warmup starts at 0
    assert "eval_loss" in rows[-1] and len(rows[-1]["eval_table"]) == 1
    assert set(rows[-1]["eval_table"][0]) == {"gold", "generated", "exact", "runs"}
    assert len(list((tmp_path / "last_run_prepared").glob("*.pt"))) == 1
    saved = json.loads((out / "adapter" / "training_config.json").read_text())
    assert saved["datasets"][0]["type"] == "context_qa.load_v2"


def test_prepared_dataset_is_reused_for_the_same_inputs_only(setup, tmp_path):
    from qlora.data import fingerprint, prepare_data_cached

    spec = [{"path": str(setup / "rows.jsonl"), "type": "context_qa"}]
    calls = []

    def make():
        calls.append(1)
        from qlora.data import Data, Example
        return Data(train=[Example([1, 2], [-100, 2])], val=[], rows=1)

    key = fingerprint(spec, sequence_len=256)
    first, how = prepare_data_cached(tmp_path, key, make)
    again, how_again = prepare_data_cached(tmp_path, key, make)
    assert len(calls) == 1 and "read from" in how_again and again == first
    assert fingerprint(spec, sequence_len=512) != key
    assert fingerprint([{**spec[0], "type": "context_qa.load_v2"}], sequence_len=256) != key


# ----------------------------------------------------------------------------- Ctrl-C where it matters

def _sigint_during(monkeypatch, target, name, at_call: int):
    """Make target.name send this process a real SIGINT on its at_call-th call (then run as usual)."""
    import os
    import signal

    real, calls = getattr(target, name), {"n": 0}
    # The test needs Python's own SIGINT handler (KeyboardInterrupt): a parent that ignores SIGINT
    # (a background job of a non-interactive shell) or an earlier test may have left another one.
    # Python's default is left in place after the test: it is what every other test expects too.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def wrapped(*a, **k):
        calls["n"] += 1
        if calls["n"] == at_call:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(target, name, wrapped)
    return real


@pytest.mark.parametrize("where, target, name, at_call, saved_step", [
    ("in the optimizer update of step 3 (held until it is done)", "train", "optimizer_step", 3, 3),
    ("in the evaluation after step 4", "train", "batches_in_order", 1, 4),
    ("in writing checkpoint-4 (held until it is complete)", "train", "save_adapter", 1, 4),
])
def test_ctrl_c_saves_one_consistent_state_and_resume_equals_the_whole_run(setup, tmp_path, monkeypatch, whole_run,
                                                                           where, target, name, at_call, saved_step):
    parts = tmp_path / "parts"
    real = _sigint_during(monkeypatch, train, name, at_call)
    assert train.main(args(setup, parts)) == 130, where
    monkeypatch.setattr(train, name, real)
    latest = ckpt.list_checkpoints(parts)[-1]
    state = torch.load(latest / ckpt.STATE_FILE, weights_only=False)
    assert state["step"] == saved_step, where
    # the data position is the one after that many steps of 2 micro-batches of 4 rows
    assert state["data"]["epoch"] * state["data"]["num_examples"] + state["data"]["index"] == saved_step * 2 * 4
    assert train.main(args(setup, parts, resume_from_checkpoint="true")) == 0
    assert losses(parts) == whole_run, where                       # bit for bit, step by step
