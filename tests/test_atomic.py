"""qlora/atomic.py: a write either completes or leaves the old file / directory as it was, and no
temporary behind; directories are swapped so that the old one lasts until the new one is in place."""

import pytest

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
