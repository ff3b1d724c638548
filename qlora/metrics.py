"""metrics.jsonl: one JSON line per optimizer step, appended and fsynced as training goes.

A kill can cut the last line short; reading skips such a tail. On resume from step N the file is
first rewritten (atomically, qlora/atomic.py) to the lines of steps 1..N, the steps the checkpoint
holds; the steps after it run again and append their lines anew. A kill at any moment leaves
either the old file or the rewritten one, never a shorter one.
"""

import json
import os
from pathlib import Path

from qlora.atomic import write_text


def read_metrics(path: str | Path) -> list[dict]:
    """The complete lines of a metrics file, in order ([] when there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:               # a line cut short by a kill: only ever the last
            break
    return rows


class MetricsLog:
    """Appends records to metrics.jsonl, each flushed to disk before training goes on."""

    def __init__(self, path: str | Path, resume_step: int | None):
        """resume_step None: a fresh file; N: keep the lines of steps <= N."""
        self.path = Path(path)
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if resume_step is not None else []
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()
