"""Driver of tests/test_crash.py: train.py runs that are killed with SIGKILL, then resumed, again and again.

    python tests/crash_run.py WORKDIR SEED KILLS -- TRAIN.PY ARGS...

Imports train.py once, then forks one child process per run (no torch import per run; no thread
pool exists before the fork, so the children start clean). Each child runs train.py's command line
(`--resume_from_checkpoint true`) and is killed by SIGKILL:
- at the n-th file-system event (an fsync, rename, unlink, rmdir, mkdir, torch.save or safetensors
  write, killed before it happens) after the run's first line, or counted inside checkpoint saves
  (writes, the directory swap, rotation), or at one of the first events, while the leftovers of
  the kill before are cleaned up;
- right after it prints "resumed from" or "saved";
- or after a random wall-clock delay, from the parent.
A first, uninterrupted run in WORKDIR/reference counts the events. Then campaigns, each in a fresh
WORKDIR/crashed-N: runs killed one after the other, then a run to the end, until KILLS kills are
done. WORKDIR/runs.json lists every run: its kill, how it ended, the hidden temporaries it found
(left by the kill before), and the metrics rows it left.
"""

import builtins
import itertools
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import safetensors.torch  # noqa: E402
import torch  # noqa: E402

try:                                                      # imported by train.py on the way: once, here
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import sympy  # noqa: F401
except ImportError:
    pass

import qlora.adapter  # noqa: E402
import qlora.progress  # noqa: E402
import train  # noqa: E402
from qlora.errors import run_cli  # noqa: E402
from qlora.metrics import read_metrics  # noqa: E402

TIMING = ("tokens_per_s", "mem_gib")                       # the only numbers that differ between runs

EVENTS = [(os, "fsync"), (os, "replace"), (os, "rename"), (os, "unlink"), (os, "rmdir"), (os, "mkdir"),
          (torch, "save"), (qlora.adapter, "save_file"), (safetensors.torch, "save_file")]


WHERE = {"event": None, "in_save": False, "save_events": 0}


def die(note: Path) -> None:
    note.write_text(json.dumps(WHERE))                    # what the kill interrupted, for the test
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(kill: dict, counter: list, note: Path) -> None:
    """Count file-system events; SIGKILL this process at event kill["at"] (counted from the start),
    at event kill["after_start"] counted from the first printed line, at event kill["in_save"]
    counted within checkpoint saves only, or after a printed line."""
    anchor = [None]

    def wrap(real, name):
        def hooked(*args, **kwargs):
            counter[0] += 1
            WHERE["save_events"] += WHERE["in_save"]
            if counter[0] == kill.get("at") or (anchor[0] is not None and
                                                 counter[0] - anchor[0] == kill.get("after_start")) or \
                    (WHERE["in_save"] and WHERE["save_events"] == kill.get("in_save")):
                WHERE["event"] = name
                die(note)
            return real(*args, **kwargs)
        return hooked

    for module, name in EVENTS:
        setattr(module, name, wrap(getattr(module, name), name))
    real_save = train.save_checkpoint

    def saving(*args, **kwargs):                          # marks the events of a checkpoint save
        WHERE["in_save"] = True
        try:
            return real_save(*args, **kwargs)
        finally:
            WHERE["in_save"] = False

    train.save_checkpoint = saving
    real_print = builtins.print

    def printing(*args, **kwargs):
        real_print(*args, **kwargs)
        if anchor[0] is None:
            anchor[0] = counter[0]
        if kill.get("after") and args and str(args[0]).startswith(kill["after"]):
            sys.stdout.flush()
            WHERE["event"] = "print " + kill["after"]
            die(note)

    builtins.print = printing
    real_write = qlora.progress.write

    def writing(line: str) -> None:                       # train.py's log lines above the progress bar
        real_write(line)
        if kill.get("after") and str(line).startswith(kill["after"]):
            WHERE["event"] = "print " + kill["after"]
            die(note)

    qlora.progress.write = writing


def run_child(out: Path, argv: list[str], kill: dict, log: Path) -> dict:
    """Fork a child running train.py on `out`; returns how it ended and its event count."""
    count_file = log.with_suffix(".events")
    started = time.time()
    pid = os.fork()
    if pid == 0:                                          # the child: train.py's command line, hooked
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1), os.dup2(fd, 2)
        counter = [0]
        install_kill(kill, counter, log.with_suffix(".kill"))
        try:
            code = run_cli(train.main, argv + ["--output_dir", str(out), "--resume_from_checkpoint", "true"])
        except SystemExit as e:
            print(e, file=sys.stderr)
            code = 1
        count_file.write_text(str(counter[0]))
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    done, status = 0, 0
    if "seconds" in kill:                                 # a kill from outside, at a random moment
        deadline = started + kill["seconds"]
        while time.time() < deadline and not done:
            done, status = os.waitpid(pid, os.WNOHANG)
            time.sleep(0.005)
        if not done:
            os.kill(pid, signal.SIGKILL)
    if not done:
        _, status = os.waitpid(pid, 0)
    ended = "SIGKILL" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else \
        f"exit {os.waitstatus_to_exitcode(status)}"
    events = int(count_file.read_text()) if count_file.is_file() else None
    note = log.with_suffix(".kill")
    where = json.loads(note.read_text()) if note.is_file() else None
    return {"kill": kill, "ended": ended, "events": events, "where": where, "seconds": round(time.time() - started, 2)}


def hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".")) if out.is_dir() else []


def next_kill(rng: random.Random, total: int, kills: int, seconds: float) -> dict:
    """A kill drawn at random: mostly at a file-system event within the next 2 * total / kills
    events after the start, so each run gets about total / kills events further than the last."""
    kind = rng.choices(["event", "save", "cleanup", "resumed", "saved", "clock"], [8, 6, 2, 1, 1, 2])[0]
    if kind == "event":
        return {"after_start": rng.randint(1, max(2, 2 * total // kills))}
    if kind == "save":                                    # the n-th event inside this run's saves
        return {"in_save": rng.randint(1, 30)}
    if kind == "cleanup":
        return {"at": rng.randint(1, 3)}
    if kind in ("resumed", "saved"):
        return {"after": {"resumed": "resumed from", "saved": "saved"}[kind]}
    return {"seconds": rng.uniform(0.2, seconds)}


def main() -> None:
    workdir, seed, kills = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    argv = sys.argv[sys.argv.index("--") + 1:]
    rng = random.Random(seed)
    reference = run_child(workdir / "reference", argv, {}, workdir / "reference.log")
    assert reference["ended"] == "exit 0", (workdir / "reference.log").read_text()[-3000:]
    runs, killed = [], 0
    for campaign in itertools.count():
        out = workdir / f"crashed-{campaign}"
        while True:
            kill = next_kill(rng, reference["events"], kills, reference["seconds"]) if killed < kills else {}
            while kill.get("after") == "resumed from" and not any(out.glob("checkpoint-*")):
                kill = next_kill(rng, reference["events"], kills, reference["seconds"])   # nothing to resume
            if killed % 5 == 4 and killed < kills and any(out.glob("checkpoint-*")):
                kill = {"after": "resumed from"}           # every fifth kill: right after resuming
            left = hidden(out)
            run = run_child(out, argv, kill, workdir / f"run-{len(runs)}.log")
            rows = [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(out / "metrics.jsonl")]
            run.update(campaign=campaign, left_before=left, log=f"run-{len(runs)}.log", metrics=rows)
            runs.append(run)
            killed += run["ended"] == "SIGKILL"
            if run["ended"] != "SIGKILL":                  # finished (or failed: the test says which)
                break
        if killed >= kills:
            break
    (workdir / "runs.json").write_text(json.dumps({"reference": reference, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
