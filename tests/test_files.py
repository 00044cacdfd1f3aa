"""The one atomic file writer (evaluate's batch files, the demo's report)."""

import os

import pytest

from captum_faithful import _files


def test_atomic_write_replaces_whole_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "table.csv"
    path.write_bytes(b"old")
    _files.atomic_write(path, b"new contents\n")
    assert path.read_bytes() == b"new contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
    if os.name == "posix":
        umask = os.umask(0)
        os.umask(umask)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "table.csv"
    path.write_bytes(b"old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(_files.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        _files.atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_only_unlocked_temporary_files_are_stale(tmp_path):
    import fcntl

    stale = tmp_path / ".a.csv.tmp-1-00"
    live = tmp_path / ".b.csv.tmp-2-00"
    kept = tmp_path / "a.csv"
    for path in (stale, live, kept):
        path.write_bytes(b"x")
    with open(live, "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        assert _files.remove_stale_temporary_files(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.csv.tmp-2-00", "a.csv"]
