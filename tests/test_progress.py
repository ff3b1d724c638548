"""What a user sees while train.py runs: a tqdm bar on a terminal (a real pseudo-terminal, python's
pty module), plain lines in a log or under CI; loss.png; the memory figure on the CPU. References:
the output of the process itself, the PNG signature, resource.getrusage read independently."""

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch

import train
from llama.tokenizer import train_tokenizer
from qlora.data import format_row
from qlora.sql_dataset import sql_rows, write_jsonl
from qlora.trainer import memory_gib

ROOT = Path(__file__).resolve().parents[1]
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2, "vocab_size": 384, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    rows = sql_rows(60, seed=1)
    write_jsonl(rows, root / "rows.jsonl")
    (root / "tiny.json").write_text(json.dumps(TINY))
    train_tokenizer(["".join(format_row(r, "context_qa")) for r in rows], 384, root / "tok.model")
    return root


def train_argv(setup: Path, out: Path) -> list[str]:
    values = {"base_model": setup / "tiny.json", "tokenizer": setup / "tok.model", "datasets": setup / "rows.jsonl",
              "output_dir": out, "sequence_len": 256, "micro_batch_size": 4, "max_steps": 3, "warmup_steps": 1,
              "lora_r": 2, "eval_steps": 3, "save_steps": 3, "logging_steps": 1, "val_set_size": 8}
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def environment(ci: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return env


def run_on_terminal(argv: list[str], env: dict) -> str:
    """Run train.py with stdout and stderr on a pseudo-terminal; everything it wrote there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))   # rows, columns: a real window
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave)
    os.close(slave)                                  # the child holds it; EOF (EIO) once it exits
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:                      # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        proc.wait(timeout=300)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text
    return text


def test_on_a_terminal_training_shows_a_tqdm_bar_with_loss_speed_and_memory(setup, tmp_path):
    text = run_on_terminal(train_argv(setup, tmp_path), environment(ci=False))
    assert "training:" in text and "3/3" in text and "|" in text, text
    assert "\r" in text                              # the bar redraws itself in place
    assert "loss=" in text and "tok_s=" in text and "mem=" in text and "GiB" in text
    assert "step/s" in text or "s/step" in text     # speed; tqdm's ETA is the [elapsed<remaining]
    assert "step     3/3 loss" in text               # the log lines are still printed, above the bar


@pytest.mark.parametrize("where", ["pipe", "terminal with CI=true"])
def test_in_a_log_or_under_ci_training_prints_plain_lines_only(setup, tmp_path, where):
    if where == "pipe":
        proc = subprocess.run([sys.executable, "train.py", *train_argv(setup, tmp_path)], cwd=ROOT,
                              env=environment(ci=False), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        text = proc.stdout + proc.stderr
    else:
        text = run_on_terminal(train_argv(setup, tmp_path), environment(ci=True))
    assert "step     1/3 loss" in text and "step     3/3 loss" in text
    assert "\r" not in text.replace("\r\n", "\n"), text   # a terminal turns \n into \r\n; a bar adds bare \r
    assert "training:" not in text and "it/s" not in text and "step/s" not in text and "s/step" not in text
    assert not any(c in text for c in "█▏▎▍▌▋▊▉"), text


def test_loss_png_is_written_by_default_and_atomically(setup, tmp_path, monkeypatch):
    assert train.main(train_argv(setup, tmp_path)) == 0
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000

    # A plot that fails half-way leaves the previous loss.png whole and no temporary behind.
    from matplotlib.figure import Figure

    def half_written(self, path, **kwargs):
        Path(path).write_bytes(PNG_SIGNATURE + b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError, match="disk full"):
        train.plot_loss(tmp_path)
    assert (tmp_path / "loss.png").read_bytes() == png
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".loss.png")]


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_memory_on_the_cpu_is_the_process_peak_rss():
    import resource

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # Linux: KiB
    gib = memory_gib(torch.device("cpu"))
    assert gib > 0.01                                # a Python with torch loaded holds far more than 10 MiB
    assert abs(gib - peak_kib / 2**20) < 0.05


def test_tensorboard_event_files_hold_the_metrics_when_tensorboard_is_installed(setup, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train.main(train_argv(setup, tmp_path)) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in loss] == [r["step"] for r in records]
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)  # stored as float32
    assert [e.step for e in events.Scalars("train/eval_loss")] == [3]


def test_without_tensorboard_no_event_files_and_no_message(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # import fails as if not installed
    assert train.main(train_argv(setup, tmp_path)) == 0
    assert not (tmp_path / "runs").exists()
    assert "tensorboard" not in capsys.readouterr().out.replace(str(tmp_path), "").lower()
