"""Mistakes a user can make end as one line, `error: ...`, naming the thing and the fix; no traceback.

train.py and infer.py raise ValueError (a bad value), FileNotFoundError / OSError (a path, the
disk) or ConnectionError (the hub) with such a message; run_cli prints it and exits non-zero.
`--debug` anywhere on the command line shows the traceback instead. The exit status is 1.
"""

import errno
import json
import os
import sys
from pathlib import Path
from typing import Callable

USER_ERRORS = (ValueError, OSError)   # OSError holds FileNotFoundError, PermissionError, ConnectionError


def one_line(e: BaseException) -> str:
    """The error as one line starting `error: `."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {e.filename}" if e.filename else ""
        text = (f"the disk is full{where}: free some space and run again (a half-written file was removed; "
                "train.py: add --resume_from_checkpoint true to go on from the last complete checkpoint)")
    elif isinstance(e, OSError) and e.errno is not None and e.filename and not str(e).startswith(str(e.filename)):
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return "error: " + " ".join(text.split())


def run_cli(main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """main(argv), a user error turned into SystemExit("error: ...") (one line on stderr, status 1);
    with --debug the exception propagates, traceback and all."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        return main([a for a in argv if a != "--debug"])
    except USER_ERRORS as e:
        if debug:
            raise
        line = one_line(e)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:     # under torchrun: which rank says it
            line = line.replace("error: ", f"error: rank {os.environ.get('RANK', '?')}: ", 1)
        raise SystemExit(line) from None


def read_text(path, what: str = "file") -> str:
    """A UTF-8 text file; a ValueError naming the file and the first bad byte otherwise."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): "
                         "save it as UTF-8") from None


def read_json(path, what: str = "file"):
    """A JSON file's value; a ValueError naming the file and the place of the mistake otherwise."""
    path = Path(path)
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}): "
                         "fix the file or write it again") from None
