"""TensorBoard event files beside metrics.jsonl, when the `tensorboard` package is installed.

`tensorboard --logdir OUTPUT_DIR/runs` then shows the same numbers as metrics.jsonl and loss.png.
Without tensorboard nothing is written and nothing is said: metrics.jsonl stays the record. Event
files are appended to as training goes (like metrics.jsonl), not written atomically.
"""

from pathlib import Path

SCALARS = ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "mem_gib")


def open_event_log(output_dir: Path, resumed_at: int | None = None):
    """A torch.utils.tensorboard SummaryWriter on output_dir/runs, or None without tensorboard.

    resumed_at: the step a resumed run continues from; events after it (steps that run again) are dropped."""
    try:
        from torch.utils.tensorboard import SummaryWriter   # needs the tensorboard package
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(Path(output_dir) / "runs"),
                         purge_step=None if resumed_at is None else resumed_at + 1)


def log_record(writer, record: dict) -> None:
    """One metrics.jsonl record as scalars at its step (train/loss, train/eval_loss, ...)."""
    if writer is None:
        return
    for key in SCALARS:
        if key in record:
            writer.add_scalar(f"train/{key}", record[key], record["step"])
