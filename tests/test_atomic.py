from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline import atomic
from pipeline.atomic import atomic_open, atomic_write, file_lock, staging_dir
from pipeline.errors import RegisterError


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_replaces(tmp_path: Path) -> None:
    dst = tmp_path / "a.txt"
    dst.write_text("old")
    with atomic_write(dst) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".txt"
        tmp.write_text("new")
        assert dst.read_text() == "old"
    assert dst.read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_atomic_write_failure_keeps_old(tmp_path: Path) -> None:
    dst = tmp_path / "a.txt"
    dst.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(dst) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert dst.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_write_nothing_written_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), atomic_write(tmp_path / "x.bin"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_atomic_open_text(tmp_path: Path) -> None:
    with atomic_open(tmp_path / "sub" / "t.csv", "w", encoding="utf-8-sig") as f:
        f.write("街道\n")
    assert (tmp_path / "sub" / "t.csv").read_bytes().startswith(b"\xef\xbb\xbf")


def test_staging_dir_merges(tmp_path: Path) -> None:
    final = tmp_path / "out"
    (final / "evidence").mkdir(parents=True)
    (final / "keep.txt").write_text("keep")
    (final / "a.txt").write_text("old")
    (final / "evidence" / "old.png").write_text("o")
    with staging_dir(final) as stage:
        assert stage.parent == tmp_path and stage.name.startswith("out.partial-")
        (stage / "a.txt").write_text("new")
        (stage / "evidence").mkdir()
        (stage / "evidence" / "p1.png").write_text("p")
        (stage / "run.json").write_text("{}")
    assert (final / "a.txt").read_text() == "new"
    assert (final / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in (final / "evidence").iterdir()) == ["old.png", "p1.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_staging_dir_replaces_named_subfolders(tmp_path: Path) -> None:
    """A rerun's evidence replaces the earlier run's (patches it no longer has lose theirs),
    but only when it wrote evidence at all; the stale files go before the manifest moves."""
    final = tmp_path / "out"
    (final / "evidence").mkdir(parents=True)
    (final / "evidence" / "gone.png").write_text("o")
    (final / "evidence" / "kept.png").write_text("o")
    (final / "work").mkdir()
    (final / "work" / "scores.tif").write_text("s")
    with staging_dir(final, replace=("evidence", "work")) as stage:
        (stage / "evidence").mkdir()
        (stage / "evidence" / "kept.png").write_text("n")
        (stage / "run.json").write_text("{}")
    assert sorted(p.name for p in (final / "evidence").iterdir()) == ["kept.png"]
    assert (final / "evidence" / "kept.png").read_text() == "n"
    assert (final / "work" / "scores.tif").exists()  # no work/ staged: left as it was


def test_staging_dir_moves_manifest_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    moved: list[str] = []
    real = os.replace

    def spy(a: os.PathLike[str], b: os.PathLike[str]) -> None:
        moved.append(Path(b).name)
        real(a, b)

    monkeypatch.setattr(atomic.os, "replace", spy)
    (tmp_path / "out").mkdir()  # an existing folder (a rerun): merged file by file
    with staging_dir(tmp_path / "out") as stage:
        for name in ("run.json", "a.txt", "z.txt"):
            (stage / name).write_text(name)
    assert moved[-1] == "run.json" and set(moved) == {"run.json", "a.txt", "z.txt"}


def test_staging_dir_publishes_a_new_folder_in_one_rename(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic.os, "replace", lambda *a: pytest.fail("moved file by file"))
    with staging_dir(tmp_path / "out") as stage:
        (stage / "evidence").mkdir()
        (stage / "evidence" / "p1.png").write_bytes(b"png")
        (stage / "run.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "evidence" / "p1.png").read_bytes() == b"png"
    assert (tmp_path / "out" / "run.json").read_text() == "{}"


def test_staging_dir_failure_leaves_final_untouched(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "a.txt").write_text("old")
    with pytest.raises(ValueError), staging_dir(final) as stage:
        (stage / "a.txt").write_text("new")
        (stage / "b.txt").write_text("new")
        raise ValueError("export failed")
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    assert (final / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_staging_dir_failure_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError), staging_dir(tmp_path / "new") as stage:
        (stage / "x").write_text("x")
        raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_file_lock_times_out(tmp_path: Path) -> None:
    target = tmp_path / "register.gpkg"
    with file_lock(target) as lock:
        assert lock == tmp_path / "register.gpkg.lock"
        # flock locks belong to the open file description: a second open blocks even here
        with pytest.raises(RegisterError, match="locked"), file_lock(target, timeout_s=0.2):
            pass
    with file_lock(target, timeout_s=0.2):  # released
        pass
