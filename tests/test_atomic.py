"""Atomic writes: all or nothing, and the permissions of an ordinary write under the umask."""

import os
import stat
from pathlib import Path

import pytest

from cryovae.atomic import atomic_dir, atomic_path, write_text_atomic


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_and_folders_get_the_modes_a_plain_write_gets(tmp_path, umask):
    plain_file = tmp_path / "plain.txt"
    plain_file.write_text("x")
    plain_dir = tmp_path / "plain_dir"
    plain_dir.mkdir()
    write_text_atomic(tmp_path / "a.txt", "x")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "inside.txt").write_text("x")
    assert _mode(tmp_path / "a.txt") == _mode(plain_file) == 0o666 & ~umask
    assert _mode(tmp_path / "folder") == _mode(plain_dir) == 0o777 & ~umask
    assert os.umask(umask) == umask  # reading the umask left it as it was


def test_a_failed_write_leaves_the_old_output_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(folder) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old" and (folder / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "out.txt"]
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]


def test_atomic_dir_replaces_a_previous_folder_whole(tmp_path):
    folder = tmp_path / "folder"
    for names in (["a.star", "b.star"], ["c.star"]):
        with atomic_dir(folder) as tmp:
            for name in names:
                (tmp / name).write_text(name)
    assert sorted(p.name for p in folder.iterdir()) == ["c.star"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
