"""train.py on torch.distributed, CPU and gloo, 2 processes started by torchrun (python -m
torch.distributed.run): DDP and FSDP2 equal one process with the same global batch, a killed rank
stops the job and resume continues its curve, bad setups fail with one line.

References: the single-process run (python train.py) of the same rows with twice the gradient
accumulation (micro-batch 5 x GA 4 = 5 x GA 2 x 2 ranks): its loss, eval loss and grad norm at
every step and its final adapter; for the killed run, the uninterrupted 2-rank run.
The rows: 152 train rows in micro-batches of 5, so every epoch ends with a micro-batch of 2 rows,
and its 31 micro-batches make steps that straddle the epoch boundary (rank 0 and 1 swap there).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import write_train_inputs
from qlora import checkpoint as ckpt
from qlora.data import Batches, Example
from qlora.distributed import RankBatches

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_train_inputs(tmp_path_factory.mktemp("distributed"))


def args(setup: Path, out: Path, **extra) -> list[str]:
    values = {"base_model": setup / "tiny.json", "tokenizer": setup / "tok.model", "datasets": setup / "rows.jsonl",
              "output_dir": out, "sequence_len": 256, "micro_batch_size": 5, "gradient_accumulation_steps": 2,
              "max_steps": 10, "warmup_steps": 2, "learning_rate": 3e-3, "lora_r": 4, "lora_alpha": 8,
              "lora_dropout": 0.0, "eval_steps": 5, "save_steps": 5, "logging_steps": 1, "val_set_size": 12}
    # 12 val rows: micro-batches of 5, 5 and 2, so under 2 ranks one rank repeats a batch it does not count.
    values.update(extra)
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def command(ranks: int | None) -> list[str]:
    """python train.py, or torchrun with `ranks` processes (--standalone: a free port of its own)."""
    launcher = [] if ranks is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return [sys.executable, *launcher, str(REPO / "train.py")]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}   # one thread per process: two processes share two cores


def run(setup: Path, out: Path, ranks: int | None, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(command(ranks) + args(setup, out, **extra), capture_output=True, text=True,
                          timeout=600, env=ENV, cwd=REPO)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(reference: Path, out: Path) -> None:
    """Every step's loss, grad norm, lr, epoch and eval loss, and the final adapter, in fp32 to ~1e-6."""
    want, got = metrics(reference), metrics(out)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 11))
    for key in ("loss", "grad_norm", "lr", "epoch", "eval_loss"):
        assert [r.get(key) is None for r in got] == [r.get(key) is None for r in want], key
        assert [r[key] for r in got if key in r] == pytest.approx([r[key] for r in want if key in r],
                                                                  rel=1e-5, abs=1e-7), key
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (reference, out))
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    state = lambda d: torch.load(d / "checkpoint-10" / ckpt.STATE_FILE, weights_only=False)  # noqa: E731
    assert state(out)["data"] == state(reference)["data"]         # the same position in the one stream


@pytest.fixture(scope="module")
def one_process(setup):
    out = setup / "one"
    done = run(setup, out, None, gradient_accumulation_steps=4)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_rank_batches_deal_out_the_one_stream_each_row_once_per_epoch():
    """Rank 0's and rank 1's micro-batches, interleaved, are one process's micro-batches (23 rows in
    micro-batches of 4: 6 per epoch, the last of 3 rows), and both end at its data position."""
    examples = [Example([1] * (i % 5 + 2), [2] * (i % 5 + 2)) for i in range(23)]
    one = Batches(examples, 4, seed=3)
    ranks = [RankBatches(Batches(examples, 4, seed=3), r, 2) for r in range(2)]
    for _ in range(9):                                   # 18 micro-batches: three epochs
        for rank in ranks:
            assert torch.equal(next(rank)["input_ids"], next(one)["input_ids"])
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()
    assert one.state_dict()["epoch"] == 2 and len(ranks[0]) == 6


def test_ddp_equals_one_process_with_the_same_global_batch(setup, one_process):
    out = setup / "ddp"
    done = run(setup, out, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 rank(s) (ddp): 5 x 2 x 2 rows per step" in done.stdout
    assert_same_training(one_process, out)


def test_fsdp_equals_one_process_and_each_rank_holds_half_the_base(setup, one_process, tmp_path):
    out = setup / "fsdp"
    done = run(setup, out, 2, distributed="fsdp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_training(one_process, out)
    shares = re.findall(r"rank (\d): base weights ([\d.]+) of ([\d.]+) MiB", done.stdout)
    assert [int(r) for r, _, _ in shares] == [0, 1]
    for _, mine, whole in shares:      # packed bytes, absmax, embeddings, norms, lm_head: halved
        assert float(mine) / float(whole) == pytest.approx(0.5, abs=0.02)   # (the code books are replicated)

    # Saved under 2 ranks, resumed in one process with GA 4 (the same global batch): the same curve.
    parts = tmp_path / "resumed"
    parts.mkdir()
    (parts / "metrics.jsonl").write_text("".join((out / "metrics.jsonl").read_text().splitlines(True)[:5]))
    shutil.copytree(out / "checkpoint-5", parts / "checkpoint-5")
    done = run(setup, parts, None, gradient_accumulation_steps=4, resume_from_checkpoint=parts / "checkpoint-5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "saved by 2 rank(s), this run has 1" in done.stdout and "20 -> 20 rows per step" in done.stdout
    assert_same_training(one_process, parts)


def test_fsdp_reads_a_checkpoint_stored_in_4bit_one_share_per_rank(setup, tmp_path):
    # A base stored in 4-bit (bitsandbytes' format): each rank moves only its rows of every weight to
    # its device (qlora.distributed.shard_stored), and training equals one process on the same file.
    from bench.random_model import write_prequantized_checkpoint
    base = write_prequantized_checkpoint(tmp_path / "nf4", json.loads((setup / "tiny.json").read_text()),
                                         device="cpu")
    for out, ranks, extra in ((tmp_path / "one", None, {"gradient_accumulation_steps": 4}),
                              (tmp_path / "fsdp", 2, {"distributed": "fsdp"})):
        done = run(setup, out, ranks, base_model=base, **extra)
        assert done.returncode == 0, done.stderr[-3000:]
    assert_same_training(tmp_path / "one", tmp_path / "fsdp")
    shares = re.findall(r"rank (\d): base weights ([\d.]+) of ([\d.]+) MiB", done.stdout)
    assert len(shares) == 2 and all(float(m) / float(w) == pytest.approx(0.5, abs=0.02) for _, m, w in shares)


def test_shard_stored_keeps_only_this_ranks_rows(monkeypatch):
    # Rank 1 of 2: the skeleton's packed bytes and absmax are meta (nothing of the whole weight on the
    # device), its rows are the second half of the row groups, and the replicated state is the whole's.
    from qlora import distributed
    from qlora.linear4bit import Linear4bit
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    layer = Linear4bit.from_weight(torch.randn(96, 80), None, 64, double_quant=True, compute_dtype=torch.float32)
    group, groups, blocks = 4, 24, 5                       # row_group(80, 64) = 4 rows = 5 blocks of 64
    skeleton = distributed.shard_stored(layer, torch.device("cpu"))
    assert skeleton.packed.is_meta and skeleton.absmax.is_meta and skeleton.packed.shape == layer.packed.shape
    packed, absmax = skeleton.rows
    assert torch.equal(packed, layer.packed.view(groups, group * 80 // 2)[12:])
    assert torch.equal(absmax, layer.absmax.view(groups, blocks)[12:])
    for name in ("code", "absmax2", "code2", "offset"):
        assert torch.equal(getattr(skeleton, name), getattr(layer, name)), name


def rank_pids(launcher: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes below the launcher's pid (Linux /proc)."""
    def parent(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = dict(kv.split("=", 1) for kv in (entry / "environ").read_bytes().decode(errors="replace")
                           .split("\0") if "=" in kv)
            pid, ancestors = int(entry.name), []
            while pid > 1 and len(ancestors) < 4:
                pid = parent(pid)
                ancestors.append(pid)
        except (OSError, ValueError, IndexError):          # gone meanwhile, or not ours to read
            continue
        if launcher in ancestors and "RANK" in environ and "TORCHELASTIC_RUN_ID" in environ:
            found[int(environ["RANK"])] = int(entry.name)
    return found


def test_a_killed_rank_stops_the_job_and_resume_continues_the_curve(setup, tmp_path):
    """SIGKILL rank 1 once checkpoint-5 is complete: the job fails naming rank 1, every checkpoint
    on disk is complete, and a resumed 2-rank run ends with the uninterrupted run's curve, bit for
    bit (dropout on: each rank's RNG comes back)."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    done = run(setup, whole, 2, lora_dropout=0.1)
    assert done.returncode == 0, done.stderr[-3000:]

    job = subprocess.Popen(command(2) + args(setup, parts, lora_dropout=0.1), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=ENV, cwd=REPO)
    try:
        while not (parts / "checkpoint-5" / ckpt.MANIFEST).exists() and job.poll() is None:
            time.sleep(0.01)
        pids = rank_pids(job.pid)
        os.kill(pids[0], signal.SIGSTOP)          # hold rank 0 where it is, so that the kill lands mid-run
        os.kill(pids[1], signal.SIGKILL)
        os.kill(pids[0], signal.SIGCONT)
        output, _ = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode != 0
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: -9", output), output[-3000:]
    assert len(metrics(parts)) < 10
    for path in ckpt.list_checkpoints(parts):
        ckpt.check_complete(path)                  # size and SHA-256 of every file as saved
    assert ckpt.find_checkpoint(parts, True)[0] == parts / "checkpoint-5"

    done = run(setup, parts, 2, lora_dropout=0.1, resume_from_checkpoint="true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    numbers = lambda out: [{k: r.get(k) for k in ("step", "loss", "grad_norm", "lr", "eval_loss")}  # noqa: E731
                           for r in metrics(out)]
    assert numbers(parts) == numbers(whole)                        # bit for bit, step by step


def test_bad_setups_fail_with_one_line_and_write_nothing(setup, tmp_path):
    out = tmp_path / "out"
    done = run(setup, out, 2, batch_size=12)
    assert done.returncode != 0
    assert ("error: rank 0: batch_size 12 is not a multiple of micro_batch_size 5 x 2 rank(s) = 10"
            in done.stderr), done.stderr[-3000:]
    done = run(setup, out, 2, distributed="fsdp", fp16="true")
    assert done.returncode != 0
    assert "error: rank 0: distributed: fsdp does not support fp16" in done.stderr, done.stderr[-3000:]
    assert not out.exists()
    with pytest.raises(ValueError, match="torchrun --nproc_per_node N"):
        train.main(args(setup, out, distributed="fsdp"))


def test_fsdp_on_the_kernel_path_equals_ddp_and_one_process(setup, tmp_path):
    """One bf16 step through Linear4bit's Triton kernels (TRITON_INTERPRET=1: the GPU's path), gradient
    checkpointing on (tests/distributed_step.py): FSDP2's NF4 bytes and absmax, each rank having
    quantized its own rows, are one process's bit for bit; its step equals DDP's bit for bit, and both equal one
    process to bf16's rounding (their micro-batches are half as long, so the products round apart)."""
    step = str(REPO / "tests" / "distributed_step.py")
    results = {}
    for mode in ("one", "ddp", "fsdp"):
        out = tmp_path / f"{mode}.pt"
        launcher = command(None)[:1] if mode == "one" else command(2)[:-1]
        done = subprocess.run([*launcher, step, str(out), str(setup / "tiny.json"), mode], capture_output=True,
                              text=True, timeout=300, env=ENV, cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
        results[mode] = torch.load(out)
    one, ddp, fsdp = results["one"], results["ddp"], results["fsdp"]
    assert len(one["quantized"]) == 2 * 7 * 4     # packed, absmax, absmax2, offset of 14 layers
    for name, value in one["quantized"].items():  # each rank quantized its rows: the whole is one process's
        assert torch.equal(fsdp["quantized"][name], value), name
    assert fsdp["loss"] == ddp["loss"] and fsdp["grads"].keys() == ddp["grads"].keys() == one["grads"].keys()
    for name in one["grads"]:
        assert torch.equal(fsdp["grads"][name], ddp["grads"][name]), name
        torch.testing.assert_close(ddp["grads"][name], one["grads"][name], rtol=0.02,
                                   atol=0.02 * one["grads"][name].abs().max().item())
    assert ddp["loss"] == pytest.approx(one["loss"], rel=1e-3)
