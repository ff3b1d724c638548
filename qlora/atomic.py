"""Atomic writes: a file or directory is either the old one or the whole new one, never half-written.

Everything the project writes goes through here (adapters, merged exports, training checkpoints,
JSONL rows, tokenizers, loss.png). The new content is written under a temporary name in the same
directory (so the final rename stays on one file system), flushed to disk (fsync of the files and
of the directory), then renamed over the target. A crash before the rename leaves the old target
untouched and at most a hidden temporary; a failure removes the temporary.

A directory cannot be renamed over a non-empty one, so an existing directory is swapped: on Linux
in one step (renameat2 RENAME_EXCHANGE), elsewhere the old one is first renamed aside; either way
the old directory is deleted only once the new one is in place.

A process killed mid-write leaves its hidden temporaries behind (`.NAME.tmp-PID-HEX`, and, where
directories are renamed aside, `.NAME.old-PID-HEX`; remove_dir's `.NAME.del-PID-HEX`):
clean_leftovers(directory) removes those of processes no longer running, at the start of a run.
Every file written gets the mode a plain open() would give it (0644 under the usual umask 022):
some writers (safetensors' save_file) create 0600 files, which other users and tools then cannot read.
"""

import ctypes
import errno
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable


def _file_mode() -> int:
    mask = os.umask(0)                              # the only portable way to read the umask is to set it
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()                            # read once, at import (umask is process-wide)


def _temp_name(path: Path, kind: str) -> Path:
    # Hidden, unique, and with the target's suffix (writers such as savefig go by the extension).
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


# _temp_name's pattern: .{name}.{kind}-{pid}-{8 hex}{suffix}
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)-[0-9a-f]{8}(?:\.[^.]*)?")


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
        os.chmod(tmp, FILE_MODE)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        full = _disk_full(e, path.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise
    _fsync(path.parent)
    return path


def _disk_full(error: BaseException, directory: Path) -> bool:
    """Whether a failed write ran out of disk space. Writers such as torch.save report a full disk as a
    RuntimeError ("unexpected pos"), so a failure while almost no space is left counts as one too."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(error, Exception):              # KeyboardInterrupt: not the disk
        return False
    try:
        return shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


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
            if file.is_file():
                os.chmod(file, FILE_MODE)
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
    except BaseException as e:
        full = _disk_full(e, path.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
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


def remove_dir(path) -> None:
    """Delete a directory so that it is never seen half-deleted: renamed to a hidden name first
    (one atomic step), then removed. A crash mid-delete leaves only the hidden name."""
    path = Path(path)
    doomed = _temp_name(path, "del")
    os.replace(path, doomed)
    _fsync(path.parent)
    shutil.rmtree(doomed)


def _running(pid: int) -> bool:
    if pid == os.getpid():                            # an earlier process with our pid: we wrote nothing yet
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                           # exists, owned by another user
        return True
    return True


def clean_leftovers(directory) -> list[str]:
    """Remove the temporaries that killed writers left in `directory`; return what was done, a line each.

    Call it before this process writes in `directory` (its own temporaries would look like leftovers).

    A `.old` directory whose target is missing (a crash between the two renames of write_dir's
    fallback) is the last complete version: it is renamed back instead of deleted. Temporaries of a
    process still running (another writer in the same directory) are left alone and reported.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    done = []
    for path in sorted(directory.iterdir()):
        match = _TEMP.fullmatch(path.name)
        if not match:
            continue
        target = directory / match["name"]
        if _running(int(match["pid"])):
            done.append(f"kept {path.name}: process {match['pid']} is still running and may be writing it")
        elif match["kind"] == "old" and not target.exists():
            os.replace(path, target)
            done.append(f"restored {target.name} from {path.name} (a write was interrupted mid-swap)")
        else:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            done.append(f"removed {path.name}, left by an interrupted write")
    if done:
        _fsync(directory)
    return done


def check_writable_dir(path, what: str = "output_dir") -> Path:
    """Check that `path` is, or can be made, a directory this process may write in; create nothing.

    ValueError naming the path otherwise: a file in the way, a read-only place, /proc or /sys.
    """
    path = Path(path).expanduser().absolute()
    for system in ("/proc", "/sys", "/dev"):
        if path == Path(system) or Path(system) in path.parents:
            raise ValueError(f"{what} {path} is under {system}, which holds no files: choose a directory on a disk")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {path}: {existing} is a file, not a directory: choose another {what} "
                         "or move the file")
    read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
    if read_only or not os.access(existing, os.W_OK | os.X_OK):
        why = " (a read-only file system)" if read_only else ""
        raise ValueError(f"{what} {path}: {existing} is not writable{why}: choose another {what}")
    return path
