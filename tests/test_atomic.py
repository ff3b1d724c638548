"""qlora/atomic.py: a write either completes or leaves the old file / directory as it was, and no
temporary behind; directories are swapped so that the old one lasts until the new one is in place."""

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from qlora import atomic


def names(directory):
    return sorted(p.name for p in directory.iterdir())


def test_write_file_replaces_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    atomic.write_text(path, "old\n")
    atomic.write_bytes(path, b"new\n")
    assert path.read_bytes() == b"new\n" and names(path.parent) == ["rows.jsonl"]


def test_a_failure_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "loss.png"
    path.write_text("old")

    def half_then_crash(tmp):
        assert tmp.parent == path.parent and tmp.suffix == ".png" and tmp.name.startswith(".")
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_file(path, half_then_crash)
    assert path.read_text() == "old" and names(tmp_path) == ["loss.png"]


def fill(files: dict):
    def write(directory):
        for name, text in files.items():
            (directory / name).write_text(text)
    return write


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_write_dir_swaps_in_the_new_directory(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "adapter"
    atomic.write_dir(out, fill({"a.txt": "1", "b.txt": "2"}))
    atomic.write_dir(out, fill({"c.txt": "3"}), overwrite=True)
    assert names(out) == ["c.txt"] and (out / "c.txt").read_text() == "3"
    assert names(tmp_path) == ["adapter"]                 # no temporary or old directory left


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_a_failure_mid_write_keeps_the_old_directory_and_leaves_no_temp(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "checkpoint-4"
    atomic.write_dir(out, fill({"state.pt": "old"}))

    def crash(directory):
        (directory / "state.pt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_dir(out, crash, overwrite=True)
    assert names(out) == ["state.pt"] and (out / "state.pt").read_text() == "old"
    assert names(tmp_path) == ["checkpoint-4"]
    with pytest.raises(OSError, match="disk full"):
        atomic.write_dir(tmp_path / "new", crash)
    assert names(tmp_path) == ["checkpoint-4"]            # a new directory appears whole or not at all


def test_write_dir_refuses_to_clobber(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty: choose a new directory or pass overwrite=True"):
        atomic.write_dir(tmp_path / "busy", fill({"x": "y"}))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        atomic.write_dir(tmp_path / "file", fill({"x": "y"}), overwrite=True)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me" and names(tmp_path) == ["busy", "file"]


def test_exchange_swaps_two_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "from_a").touch()
    if not atomic._exchange(a, b):
        pytest.skip("renameat2 RENAME_EXCHANGE is not available here")
    assert names(b) == ["from_a"] and names(a) == []


def test_leftovers_of_dead_writers_are_removed_and_an_interrupted_swap_restored(tmp_path):
    dead = 2**22 + 12345                                  # above the default pid_max: no such process
    (tmp_path / f".metrics.jsonl.tmp-{dead}-0123abcd.jsonl").write_text("half")
    (tmp_path / f".checkpoint-4.tmp-{dead}-89abcdef").mkdir()
    (tmp_path / f".checkpoint-2.del-{dead}-00000000").mkdir()
    (tmp_path / f".adapter.old-{dead}-11111111").mkdir()  # renamed aside, the new one never renamed in
    (tmp_path / f".adapter.old-{dead}-11111111" / "w").write_text("last complete")
    (tmp_path / f".loss.png.tmp-{os.getppid()}-22222222.png").write_text("live")
    (tmp_path / "checkpoint-6").mkdir()
    report = atomic.clean_leftovers(tmp_path)
    assert len(report) == 5 and sum("removed" in line for line in report) == 3
    assert names(tmp_path) == [f".loss.png.tmp-{os.getppid()}-22222222.png", "adapter", "checkpoint-6"]
    assert (tmp_path / "adapter" / "w").read_text() == "last complete"


def test_remove_dir_never_shows_a_half_deleted_directory(tmp_path, monkeypatch):
    (tmp_path / "checkpoint-2").mkdir()
    for name in "abc":
        (tmp_path / "checkpoint-2" / name).write_text(name)

    def crash(path, *a, **k):                             # killed mid-delete
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic.remove_dir(tmp_path / "checkpoint-2")
    assert not (tmp_path / "checkpoint-2").exists()
    monkeypatch.undo()
    atomic.clean_leftovers(tmp_path)
    assert names(tmp_path) == []


def test_a_writer_failing_on_a_full_disk_is_reported_as_one(tmp_path, monkeypatch):
    from collections import namedtuple

    from qlora.errors import one_line

    def torch_save_on_a_full_disk(tmp):                   # what torch.save raises there
        (tmp / "trainer_state.pt").write_text("half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 34944 vs 34832")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 4096, 4096))
    with pytest.raises(OSError) as e:
        atomic.write_dir(tmp_path / "checkpoint-4", torch_save_on_a_full_disk)
    assert names(tmp_path) == []
    assert one_line(e.value).startswith(f"error: the disk is full writing {tmp_path / 'checkpoint-4'}: free some space")
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: usage(10**9, 0, 10**9))
    with pytest.raises(RuntimeError):                     # plenty of space: the writer's own error
        atomic.write_dir(tmp_path / "checkpoint-4", torch_save_on_a_full_disk)

def test_every_file_gets_the_mode_open_gives_safetensors_too(tmp_path):
    """safetensors' save_file creates 0600 files; what we keep is 0644 (under umask 022) like the rest."""
    mask = os.umask(0)
    os.umask(mask)
    expected = 0o666 & ~mask

    def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)

    tensors = {"w": torch.zeros(2)}
    save_file(tensors, tmp_path / "plain.safetensors")
    assert mode(tmp_path / "plain.safetensors") == 0o600                # what the atomic writes correct
    atomic.write_file(tmp_path / "a.safetensors", lambda tmp: save_file(tensors, tmp))
    atomic.write_dir(tmp_path / "adapter", lambda d: (save_file(tensors, d / "adapter_model.safetensors"),
                                                      (d / "adapter_config.json").write_text("{}")))
    atomic.write_text(tmp_path / "rows.jsonl", "{}\n")
    for path in [tmp_path / "a.safetensors", tmp_path / "rows.jsonl", *(tmp_path / "adapter").iterdir()]:
        assert mode(path) == expected, path
