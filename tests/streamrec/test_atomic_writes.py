"""The archive's files and the registry's pointer under failures at every step of their atomic
writes, and read in the middle of one, through the write steps' seam
(:mod:`streamrec.loop.files`; the archiver's commit order is in ``test_archive.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faulty_files import FaultyFiles, InjectedFault

from streamrec.loop import registry
from streamrec.loop.archive import SCHEMA, TMP_PREFIX, Storage, file_name, list_archive
from streamrec.loop.files import Files
from streamrec.model.checkpoint import save_checkpoint
from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig
from streamrec.serving.served_model import ModelHolder
from streamrec.testing import tiny_serving_model


def _table(first: int, n: int) -> pa.Table:
    rows = [(f"s{j}", f"i{j}", 1.7e9 + j, None, f"e{j}", 0, j) for j in range(first, first + n)]
    cols = list(zip(*rows, strict=True))
    return pa.Table.from_arrays(
        [pa.array(c, type=SCHEMA.field(i).type) for i, c in enumerate(cols)], schema=SCHEMA
    )


REL = file_name(0, 10, 19, "2023-11-14/22")


def test_an_archive_file_is_written_fsynced_renamed_then_its_directory_fsynced(
    tmp_path: Path,
) -> None:
    files = FaultyFiles()
    storage = Storage(tmp_path, files=files)
    storage.write_atomic(REL, _table(10, 10))
    assert files.steps() == ["open_new", "write", "sync", "rename", "sync_dir"]
    tmp = files.calls[0][1]
    final = storage.join(REL)
    assert Path(tmp).parent == Path(final).parent and Path(tmp).name.startswith(TMP_PREFIX)
    assert files.calls[2] == ("sync", tmp)  # the temporary file is fsynced, before the rename
    assert files.calls[3] == ("rename", f"{tmp} -> {final}")
    assert files.calls[4] == ("sync_dir", str(Path(final).parent))
    assert pq.read_table(final).equals(_table(10, 10))
    assert [f.path for f in list_archive(storage)] == [REL]


@pytest.mark.parametrize("step", ["open_new", "write", "sync", "rename"])
def test_a_failed_step_before_the_rename_leaves_no_archive_file(tmp_path: Path, step: str) -> None:
    """A full disk, a failed fsync, a failed rename: the range is not in the archive (the
    archiver does not commit it and writes it again), at most a temporary file is left, never
    listed, and the files written before are untouched."""
    Storage(tmp_path).write_atomic(file_name(0, 0, 9, "2023-11-14/22"), _table(0, 10))
    files = FaultyFiles(step)
    storage = Storage(tmp_path, files=files)
    with pytest.raises(InjectedFault):
        storage.write_atomic(REL, _table(10, 10))
    assert not Path(storage.join(REL)).exists()
    assert [(f.first, f.last) for f in list_archive(storage)] == [(0, 9)]
    left = [p for p in storage.list_files() if Path(p).name.startswith(TMP_PREFIX)]
    assert len(left) == (step != "open_new")
    # the same range written again afterwards is whole
    Storage(tmp_path).write_atomic(REL, _table(10, 10))
    assert pq.read_table(storage.join(REL)).equals(_table(10, 10))


def test_a_crash_after_the_rename_leaves_the_whole_file(tmp_path: Path) -> None:
    storage = Storage(tmp_path, files=FaultyFiles("sync_dir", after=True))
    with pytest.raises(InjectedFault):
        storage.write_atomic(REL, _table(10, 10))
    assert pq.read_table(storage.join(REL)).equals(_table(10, 10))
    assert not [p for p in storage.list_files() if Path(p).name.startswith(TMP_PREFIX)]


def test_the_memory_filesystem_runs_the_same_steps() -> None:
    storage = Storage("memory://atomic-writes-test")
    storage.write_atomic(REL, _table(10, 10))
    assert [f.path for f in list_archive(storage)] == [REL]
    with storage.open(REL) as f:
        assert pq.read_table(f).equals(_table(10, 10))
    storage.remove(REL)
    assert list_archive(storage) == []


# ----------------------------------------------------------------------------- registry


def _registry(tmp_path: Path, n: int) -> tuple[Path, list[str]]:
    models = tmp_path / "models"
    versions = []
    for j in range(n):
        model = GRU4Rec(GRU4RecConfig(n_items=3, layers=[4]), seed=j)
        staging = registry.staging_dir(models, f"c{j}")
        ck = save_checkpoint(staging, model, "gru4rec", ["a", "b", "c"])
        versions.append(registry.add_version(models, ck))
    return models, versions


class ReadingFiles(Files):
    """Reads the registry as a worker does in the middle of every step of a write: after half
    of the bytes are written (and flushed), before and after the rename."""

    def __init__(self, models: Path) -> None:
        self.models = models
        self.holder = ModelHolder(tiny_serving_model(), watch_dir=models)
        self.seen: list[tuple[str, str | None, Path | None, Path | None]] = []

    def read(self, when: str) -> None:
        try:
            resolved: Path | None = registry.resolve(self.models)
        except registry.RegistryError as exc:
            resolved = Path(f"<error: {exc}>")
        now = registry.current_version(self.models)
        self.seen.append((when, now, resolved, self.holder.newest_checkpoint()))

    def write(self, f: IO[bytes], data: bytes) -> None:
        half = len(data) // 2
        f.write(data[:half])
        f.flush()
        self.read("mid-write")
        f.write(data[half:])

    def rename(self, src: str, dst: str) -> None:
        self.read("before rename")
        super().rename(src, dst)
        self.read("after rename")


@pytest.mark.parametrize("change", ["publish", "rollback"])
def test_the_pointer_read_while_it_is_written_names_the_old_or_the_new_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """A reader (the registry's functions, a worker's ModelHolder) that reads CURRENT in the
    middle of its replacement sees the old version whole, then the new one: never an empty,
    half-written or unknown name (a pointer written in place fails here)."""
    models, (v1, v2) = _registry(tmp_path, 2)
    registry.publish(models, v2 if change == "rollback" else v1)
    old, new = (v2, v1) if change == "rollback" else (v1, v2)
    reading = ReadingFiles(models)
    monkeypatch.setattr(registry, "files", reading)
    if change == "publish":
        registry.publish(models, new)
    else:
        registry.rollback(models, new)
    assert [s[0] for s in reading.seen] == ["mid-write", "before rename", "after rename"]
    paths = {v: models / "versions" / v for v in (v1, v2)}
    for when, name, resolved, followed in reading.seen:
        want = new if when == "after rename" else old
        assert (name, resolved, followed) == (want, paths[want], paths[want]), when
    assert registry.current_version(models) == new


@pytest.mark.parametrize("step", ["open_new", "write", "sync", "rename"])
def test_a_publish_that_fails_at_any_step_leaves_the_old_version_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    models, (v1, v2) = _registry(tmp_path, 2)
    registry.publish(models, v1)
    monkeypatch.setattr(registry, "files", FaultyFiles(step))
    with pytest.raises(InjectedFault):
        registry.publish(models, v2)
    assert registry.current_version(models) == v1
    assert registry.resolve(models) == models / "versions" / v1
    assert [v.version for v in registry.list_versions(models)] == [v1, v2]
    monkeypatch.setattr(registry, "files", Files())
    registry.publish(models, v2)  # the next try publishes
    assert registry.current_version(models) == v2


def test_a_version_is_renamed_into_the_registry_then_its_directory_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = FaultyFiles()
    monkeypatch.setattr(registry, "files", files)
    models, (v1,) = _registry(tmp_path, 1)
    assert files.steps() == ["rename", "sync_dir"]
    assert files.calls[1] == ("sync_dir", str(models / "versions"))
    registry.publish(models, v1)
    assert files.steps()[2:] == ["open_new", "write", "sync", "rename", "sync_dir"]
