"""Training checkpoints (resume state) written atomically: a temp directory renamed when complete.

A checkpoint directory `checkpoint-{step}` holds the adapter in PEFT's format (what a user keeps),
plus `trainer_state.pt` with everything needed to continue exactly: trainable weights, optimizer
and scheduler state, the data position and every random number generator. A crash mid-save leaves
only a hidden temporary directory, which is ignored, so the previous checkpoint stays the latest.

`checkpoint.json`, written last, is the completion marker: the step, the size and SHA-256 of every
other file, and the training config. Resume takes the newest checkpoint whose files match it and
skips (with a warning) one that does not, e.g. a trainer_state.pt truncated after the save. Old
checkpoints are deleted by renaming them to a hidden name first, so none is ever seen half-deleted.
"""

import hashlib
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from qlora.atomic import remove_dir, write_dir
from qlora.distributed import copy_whole_, rng_of_this_rank

STATE_FILE = "trainer_state.pt"
MANIFEST = "checkpoint.json"

# Config keys a checkpoint cannot continue under: they change which weights exist or what they mean.
FIXED_KEYS = ("base_model", "adapter", "load_in_4bit", "lora_model_dir", "lora_r", "lora_alpha", "lora_target_linear",
              "lora_target_modules")
# Keys that change nothing in the numbers.
FREE_KEYS = ("output_dir", "resume_from_checkpoint", "device", "logging_steps", "eval_steps", "save_steps",
             "distributed")


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
                    keep: int = 2, trainable: dict | None = None) -> Path:
    """Write checkpoint-{step} atomically; `write_adapter(dir)` saves the PEFT-format adapter.

    trainable: the weights to save, when not the model's own (FSDP2: gathered from the shards).
    Keeps the newest `keep` checkpoints and deletes older ones.
    """
    output_dir = Path(output_dir)
    # trainer_state may carry its own "rng" (the state at the start of an interrupted step)
    state = {"rng": rng_state(), **trainer_state, "step": step,
             "trainable": trainable if trainable is not None else trainable_state_dict(model)}

    def write(tmp: Path) -> None:
        write_adapter(tmp)
        torch.save(state, tmp / STATE_FILE)
        files = {p.name: _file_entry(p) for p in sorted(tmp.iterdir())}
        manifest = {"step": step, "files": files, "config": trainer_state.get("config", {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")   # last: complete

    # Re-saving a step (e.g. Ctrl-C right after a save) swaps the directory: the old one stays until then.
    final = write_dir(output_dir / f"checkpoint-{step}", write, overwrite=True)
    for old in list_checkpoints(output_dir)[:-keep]:
        remove_dir(old)
    return final


def _file_entry(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N directories, complete or not, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def check_complete(path: str | Path) -> dict:
    """The checkpoint's manifest, once every file it lists matches its size and SHA-256; else ValueError."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{path} has no {MANIFEST} (its save was interrupted, or an older version wrote it)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{manifest_path} is damaged ({type(e).__name__})") from None
    if STATE_FILE not in files:
        raise ValueError(f"{manifest_path} lists no {STATE_FILE}")
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"{file} is missing")
        if file.stat().st_size != want["bytes"]:
            raise ValueError(f"{file} has {file.stat().st_size} bytes, {want['bytes']} were saved (truncated?)")
        if _file_entry(file)["sha256"] != want["sha256"]:
            raise ValueError(f"{file} differs from what was saved (checksum mismatch)")
    return manifest


def find_checkpoint(output_dir: str | Path, resume: str | bool, warn=None) -> tuple[Path, dict] | None:
    """(checkpoint dir, its manifest) to resume from, or None.

    resume: False -> None; True -> the newest complete checkpoint in output_dir (None if there are
    none; incomplete ones are skipped with a warning); a path -> that checkpoint, which must be complete.
    """
    warn = warn or (lambda line: print(line, file=sys.stderr))
    if resume is False or resume in ("", None):
        return None
    if resume is True:
        skipped = []
        for path in reversed(list_checkpoints(output_dir)):
            try:
                return path, check_complete(path)
            except ValueError as e:
                skipped.append(path.name)
                warn(f"warning: skipping {path.name}: {e}; trying the one before")
        if skipped:
            raise ValueError(f"no complete checkpoint in {output_dir} ({', '.join(skipped)} are damaged): "
                             "delete them to start afresh, or set resume_from_checkpoint: false and "
                             "another output_dir")
        return None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a directory; pass a checkpoint-N "
                                "directory or true for the latest")
    try:
        return path, check_complete(path)
    except ValueError as e:
        raise ValueError(f"resume_from_checkpoint: {e}; pass another checkpoint-N directory or true for the "
                         "newest complete one") from None


def check_resume_config(saved: dict, now: dict) -> list[str]:
    """Compare the checkpoint's training config with this run's: ValueError naming the first key that
    cannot continue (FIXED_KEYS); else one warning line per other key that changed."""
    now = json.loads(json.dumps(now, default=str))   # as the manifest stores it
    for key in FIXED_KEYS:
        if key in saved and key in now and saved[key] != now[key]:
            raise ValueError(f"the checkpoint was trained with {key}={saved[key]!r}, this run sets {now[key]!r}: "
                             f"a run cannot continue with another {key}; set it back, or train afresh in "
                             "another output_dir")
    warnings = []
    for key in sorted(saved.keys() & now.keys()):
        if key not in FIXED_KEYS + FREE_KEYS and saved[key] != now[key]:
            warnings.append(f"warning: {key} is now {now[key]!r} (the checkpoint's run had {saved[key]!r}): "
                            "the new value applies from the resumed step on")
    return warnings


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict:
    """Load trainable weights into `model`, restore RNGs (this rank's, qlora/distributed.py); return the
    rest of the trainer state."""
    file = Path(path) / STATE_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{file} cannot be read ({reason}): resume from an earlier checkpoint-N") from None
    params = dict(model.named_parameters())
    missing = [name for name in state["trainable"] if name not in params]
    if missing:
        raise ValueError(f"checkpoint {path} has weights the model lacks (e.g. {missing[0]}): "
                         "was it made with other LoRA settings?")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            copy_whole_(params[name], value)               # FSDP2: this rank's rows
    rng = rng_of_this_rank(state)                          # with several ranks: each its own
    if rng is not None:
        set_rng_state(rng)
    return state
