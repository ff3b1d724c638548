"""Atomic writes: a file or directory is either the old one or the whole new one, never half-written.

Everything the project writes goes through here (adapters, merged exports, training checkpoints,
JSONL rows, tokenizers, loss.png). The new content is written under a temporary name in the same
directory (so the final rename stays on one file system), flushed to disk (fsync of the files and
of the directory), then renamed over the target. A crash before the rename leaves the old target
untouched and at most a hidden temporary; a failure removes the temporary.

A directory cannot be renamed over a non-empty one, so an existing directory is swapped: on Linux
in one step (renameat2 RENAME_EXCHANGE), elsewhere the old one is first renamed aside; either way
the old directory is deleted only once the new one is in place.
"""

import ctypes
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable


def _temp_name(path: Path, kind: str) -> Path:
    # Hidden, unique, and with the target's suffix (writers such as savefig go by the extension).
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path, write: Callable[[Path], None]) -> Path:
    """write(tmp) writes the whole file at tmp, a temporary path beside `path`; then it replaces path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, "tmp")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)
    return path


def write_bytes(path, data: bytes) -> Path:
    return write_file(path, lambda tmp: tmp.write_bytes(data))


def write_text(path, text: str) -> Path:
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_dir(path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """write(tmp) fills tmp, a new empty directory beside `path`; then it takes path's place.

    An existing non-empty directory is replaced only with overwrite=True; a file is never replaced.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file: pass a directory path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"{path} exists and is not empty: choose a new directory or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, "tmp")
    tmp.mkdir()
    try:
        write(tmp)
        for file in tmp.rglob("*"):
            _fsync(file)
        _fsync(tmp)
        if not path.exists():
            os.replace(tmp, path)
        elif _exchange(tmp, path):                    # tmp now holds the old directory
            shutil.rmtree(tmp)
        else:
            old = _temp_name(path, "old")
            os.replace(path, old)                     # a crash here leaves the old directory as `old`
            os.replace(tmp, path)
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(path.parent)
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:                             # not glibc >= 2.28 (or not Linux)
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):   # the kernel or the file system lacks it
        return False
    raise OSError(err, os.strerror(err), str(b))
