"""Training checkpoints (resume state) written atomically: a temp directory renamed when complete.

A checkpoint directory `checkpoint-{step}` holds the adapter in PEFT's format (what a user keeps),
plus `trainer_state.pt` with everything needed to continue exactly: trainable weights, optimizer
and scheduler state, the data position and every random number generator. A crash mid-save leaves
only a hidden temporary directory, which is ignored, so the previous checkpoint stays the latest.
"""

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from qlora.atomic import write_dir

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state_dict(model: torch.nn.Module) -> dict:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(output_dir: str | Path, step: int, model, write_adapter, trainer_state: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint-{step} atomically; `write_adapter(dir)` saves the PEFT-format adapter.

    Keeps the newest `keep` checkpoints and deletes older ones.
    """
    output_dir = Path(output_dir)
    # trainer_state may carry its own "rng" (the state at the start of an interrupted step)
    state = {"rng": rng_state(), **trainer_state, "step": step, "trainable": trainable_state_dict(model)}

    def write(tmp: Path) -> None:
        write_adapter(tmp)
        torch.save(state, tmp / STATE_FILE)

    # Re-saving a step (e.g. Ctrl-C right after a save) swaps the directory: the old one stays until then.
    final = write_dir(output_dir / f"checkpoint-{step}", write, overwrite=True)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def find_checkpoint(output_dir: str | Path, resume: str | bool) -> Path | None:
    """resume: False -> None; True -> the latest in output_dir (None if there is none); a path."""
    if resume is False or resume in ("", None):
        return None
    if resume is True:
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a checkpoint directory "
                                f"(no {STATE_FILE}); pass a checkpoint-N directory or true for the latest")
    return path


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict:
    """Load trainable weights into `model`, restore RNGs; return the rest of the trainer state."""
    state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    missing = [name for name in state["trainable"] if name not in params]
    if missing:
        raise ValueError(f"checkpoint {path} has weights the model lacks (e.g. {missing[0]}): "
                         "was it made with other LoRA settings?")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    set_rng_state(state["rng"])
    return state
