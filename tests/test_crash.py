"""Crash safety: train.py killed with SIGKILL at 20+ points (file-system events inside saves,
rotations and the cleanup of leftovers; right after "resumed from" and "saved"; random moments),
resumed each time. Reference: the same command run once without interruption. Every run's
metrics.jsonl is a prefix of the reference's, bit for bit; the finished run's metrics and adapter
equal the reference's; no temporary is left. tests/crash_run.py drives the runs."""

import json
import subprocess
import sys
from pathlib import Path

from llama.tokenizer import train_tokenizer
from qlora.checkpoint import check_complete, list_checkpoints
from qlora.data import format_row
from qlora.sql_dataset import sql_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
KILLS = 22
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 512, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_run_bit_for_bit(tmp_path):
    rows = sql_rows(40, seed=1)
    write_jsonl(rows, tmp_path / "rows.jsonl")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    train_tokenizer(["".join(format_row(r, "context_qa")) for r in rows], 512, tmp_path / "tok.model")
    settings = {"base_model": tmp_path / "tiny.json", "tokenizer": tmp_path / "tok.model",
                "datasets": tmp_path / "rows.jsonl", "max_steps": 12, "save_steps": 2, "eval_steps": 3,
                "val_set_size": 4, "micro_batch_size": 2, "lora_r": 2, "lora_alpha": 4, "lora_dropout": 0.1,
                "logging_steps": 1, "warmup_steps": 2}
    argv = [x for k, v in settings.items() for x in (f"--{k}", str(v))]
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "crash_run.py"), str(tmp_path), "0", str(KILLS),
                           "--", *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = json.loads((tmp_path / "runs.json").read_text())
    reference_rows = [
        {k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "mem_gib")}
        for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in reference_rows] == list(range(1, 13))
    adapter = (tmp_path / "reference" / "adapter" / "adapter_model.safetensors").read_bytes()

    runs = log["runs"]
    killed = [r for r in runs if r["ended"] == "SIGKILL"]
    assert len(killed) >= 20
    assert sum(r["where"]["in_save"] for r in killed if r["where"]) >= 3              # inside saves
    assert sum((r["where"] or {}).get("event") == "print resumed from" for r in killed) >= 2
    assert any(name.startswith(".checkpoint-") for r in runs for name in r["left_before"])
    for r in runs:
        assert r["ended"] in ("SIGKILL", "exit 0"), (tmp_path / r["log"]).read_text()[-3000:]
        assert r["metrics"] == reference_rows[:len(r["metrics"])], r["log"]          # bit for bit, every run
    for campaign in {r["campaign"] for r in runs}:
        last = [r for r in runs if r["campaign"] == campaign][-1]
        out = tmp_path / f"crashed-{campaign}"
        assert last["ended"] == "exit 0" and last["metrics"] == reference_rows, last["log"]
        assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")]           # no temporaries
        assert [p.name for p in list_checkpoints(out)] == ["checkpoint-10", "checkpoint-12"]
        for checkpoint in list_checkpoints(out):
            check_complete(checkpoint)
