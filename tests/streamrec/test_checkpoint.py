"""Checkpoint directories: round trip, and rejection of damaged ones."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from streamrec.model.api import RegisteredModel, StepModel
from streamrec.model.checkpoint import (
    CheckpointError,
    CheckpointRecord,
    load_checkpoint,
    read_checkpoint_record,
    save_checkpoint,
)
from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig

IDS = [f"item{i}" for i in range(25)]


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[Path, GRU4Rec]:
    m = GRU4Rec(
        GRU4RecConfig(n_items=25, layers=[8, 6], embedding=4, constrained_embedding=False), seed=1
    )
    with torch.no_grad():
        m.By.normal_()
    path = save_checkpoint(
        tmp_path / "ck", m, "gru4rec", IDS, train_params={"loss": "bpr-max"},
        data_stats={"n_events": 10}, metrics={"recall@20": 0.5},
    ).path  # fmt: skip
    return path, m.eval()


def _scores(m: StepModel) -> torch.Tensor:
    with torch.inference_mode():
        s = m.initial_state(None, 3)
        for rows in ([1, 2, 3], [4, -1, 24]):
            s, sc = m.step(torch.tensor(rows), s, None)
    return sc


def test_round_trip_identical_scores(ckpt: tuple[Path, GRU4Rec]) -> None:
    path, m = ckpt
    assert sorted(p.name for p in path.iterdir()) == ["checkpoint.json", "model.safetensors"]
    c = load_checkpoint(path, "cpu")
    assert isinstance(c.model, GRU4Rec) and not c.model.training
    assert c.model_name == "gru4rec" and c.item_ids == IDS and c.item_index["item7"] == 7
    assert c.train_params == {"loss": "bpr-max"} and c.metrics == {"recall@20": 0.5}
    assert c.data_stats == {"n_events": 10} and c.version and c.created_at
    assert torch.equal(_scores(c.model), _scores(m))
    rec = read_checkpoint_record(path)
    assert rec.version == c.version and rec.model_config == m.config_dict()


def test_the_version_is_the_utc_creation_time_then_the_tensors_hash(
    ckpt: tuple[Path, GRU4Rec],
) -> None:
    """Versions sort by creation time (the registry's order), and name their tensors."""
    rec = read_checkpoint_record(ckpt[0])
    created = datetime.fromisoformat(rec.created_at)
    assert created.utcoffset() is not None and not created.utcoffset()
    assert rec.version == f"{created:%Y%m%dT%H%M%SZ}-{rec.tensor_sha256[:12]}"


def test_overwrite_is_atomic_rename(ckpt: tuple[Path, GRU4Rec], tmp_path: Path) -> None:
    path, m = ckpt
    v1 = load_checkpoint(path).version
    other = GRU4Rec(
        GRU4RecConfig(n_items=25, layers=[8, 6], embedding=4, constrained_embedding=False), seed=2
    ).eval()
    save_checkpoint(path, other, "gru4rec", IDS)
    c = load_checkpoint(path)
    assert c.version != v1 and c.metrics == {}
    assert torch.equal(_scores(c.model), _scores(other))
    assert not torch.equal(_scores(c.model), _scores(m))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp dirs left behind


def test_reader_sees_old_or_new_never_a_mix(ckpt: tuple[Path, GRU4Rec]) -> None:
    """A reader loading while a writer overwrites the checkpoint again and again gets one of
    the written checkpoints whole (its version and its weights) or a clean CheckpointError."""
    import threading

    path, m = ckpt
    models = [m]
    for seed in (2, 3):
        mod = GRU4Rec(
            GRU4RecConfig(n_items=25, layers=[8, 6], embedding=4, constrained_embedding=False),
            seed=seed,
        )
        models.append(mod.eval())
    expected = {}  # tensor digest prefix (the version's suffix) -> scores
    for j, mod in enumerate(models):
        probe = save_checkpoint(path.parent / f"probe{j}", mod, "gru4rec", IDS).path
        expected[load_checkpoint(probe).version.rsplit("-", 1)[1]] = _scores(mod)
    assert len(expected) == 3
    done = threading.Event()

    def writer() -> None:
        try:
            for n in range(30):
                save_checkpoint(path, models[n % 3], "gru4rec", IDS)
        finally:
            done.set()

    seen: set[str] = set()
    errors = 0
    t = threading.Thread(target=writer)
    t.start()
    while not done.is_set() or not seen:
        try:
            c = load_checkpoint(path)
        except CheckpointError:
            errors += 1
            continue
        digest = c.version.rsplit("-", 1)[1]
        assert digest in expected, c.version
        assert torch.equal(_scores(c.model), expected[digest]), "weights of another version"
        seen.add(digest)
    t.join()
    assert seen  # at least one load succeeded while the writer ran
    c = load_checkpoint(path)
    assert torch.equal(_scores(c.model), expected[c.version.rsplit("-", 1)[1]])


def test_truncated_tensor_file(ckpt: tuple[Path, GRU4Rec]) -> None:
    path, _ = ckpt
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


def test_corrupted_tensor_file_with_matching_hash(ckpt: tuple[Path, GRU4Rec]) -> None:
    import hashlib

    path, _ = ckpt
    f = path / "model.safetensors"
    data = f.read_bytes()[:50]
    f.write_bytes(data)
    meta = json.loads((path / "checkpoint.json").read_text())
    meta["tensor_sha256"] = hashlib.sha256(data).hexdigest()
    (path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unreadable tensor file"):
        load_checkpoint(path)


def test_flipped_byte(ckpt: tuple[Path, GRU4Rec]) -> None:
    path, _ = ckpt
    f = path / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[-5] ^= 0xFF
    f.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["model_config"].update(layers=[8, 7]), "shape"),
        (lambda m: m["model_config"].update(n_items=26), "shape"),
        (lambda m: m["model_config"].update(embedding=0), "tensor names"),
        (lambda m: m["item_ids"].pop(), "item"),
        (lambda m: m["model_config"].update(bogus=1), "config"),
        (lambda m: m.update(model_name="nope"), "config"),
        (lambda m: m.pop("tensor_sha256"), "lacks"),
        (lambda m: m.update(format="pickle"), "format"),
    ],
)
def test_edited_json_rejected(ckpt: tuple[Path, GRU4Rec], edit, match: str) -> None:
    path, _ = ckpt
    meta = json.loads((path / "checkpoint.json").read_text())
    edit(meta)
    (path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=match) as refused:
        load_checkpoint(path)
    assert str(path) in str(refused.value)  # which checkpoint, for the operator


def test_missing_files(ckpt: tuple[Path, GRU4Rec], tmp_path: Path) -> None:
    path, _ = ckpt
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing model\.safetensors"):
        load_checkpoint(path)
    (path / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing checkpoint\.json"):
        load_checkpoint(path)


def test_bad_json(ckpt: tuple[Path, GRU4Rec]) -> None:
    path, _ = ckpt
    (path / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)


def test_checkpoint_replaced_between_hash_and_load_is_not_mixed(
    ckpt: tuple[Path, GRU4Rec], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replacement lands right after the loader has hashed the tensor file (the race the
    concurrent-reader test hits now and then, made certain): the loader returns the old
    checkpoint whole or raises, never the old metadata with the new weights."""
    import hashlib

    import streamrec.model.checkpoint as cp

    path, m = ckpt
    old_version = load_checkpoint(path).version
    other = GRU4Rec(
        GRU4RecConfig(n_items=25, layers=[8, 6], embedding=4, constrained_embedding=False), seed=2
    ).eval()
    replaced: list[bool] = []
    real = hashlib.sha256

    class Sha256:
        def __init__(self, *args: bytes) -> None:
            self.h = real(*args)

        def update(self, data: bytes) -> None:
            self.h.update(data)

        def hexdigest(self) -> str:
            out = self.h.hexdigest()
            if not replaced:
                replaced.append(True)
                monkeypatch.setattr(cp.hashlib, "sha256", real)
                save_checkpoint(path, other, "gru4rec", IDS)
            return out

    monkeypatch.setattr(cp.hashlib, "sha256", Sha256)
    try:
        c = load_checkpoint(path)
    except CheckpointError:
        return
    assert replaced and c.version == old_version
    assert torch.equal(_scores(c.model), _scores(m))


def test_the_record_is_read_once_from_save_to_swap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``save_checkpoint`` returns the record a read gives; the registry files it without
    reading ``checkpoint.json`` back; a worker's reload parses it once (it did twice)."""
    from streamrec.loop import registry
    from streamrec.serving.served_model import ModelHolder, ServingModel

    def model(seed: int) -> GRU4Rec:
        return GRU4Rec(GRU4RecConfig(n_items=25, layers=[8]), seed=seed)

    models = tmp_path / "models"
    first = save_checkpoint(registry.staging_dir(models, "a"), model(1), "gru4rec", IDS)
    assert first == read_checkpoint_record(first.path)
    assert first.n_items == 25 and first.model_config == model(1).config_dict()
    registry.publish(models, registry.add_version(models, first))
    published = registry.resolve(models)
    assert published is not None
    holder = ModelHolder(ServingModel.from_checkpoint(published, "cpu"), watch_dir=models)
    second = save_checkpoint(
        registry.staging_dir(models, "b"), model(2), "gru4rec", IDS, metrics={"x": np.float32(1)}
    )
    assert second.metrics == {"x": 1.0} and type(second.metrics["x"]) is float  # as JSON has it
    reads: list[Path] = []
    real = CheckpointRecord.from_json  # bound to the class

    def counted(cls: type[CheckpointRecord], meta: object, path: Path) -> CheckpointRecord:
        reads.append(path)
        return real(meta, path)

    monkeypatch.setattr(CheckpointRecord, "from_json", classmethod(counted))
    version = registry.add_version(models, second)
    assert reads == [] and version == second.version
    registry.publish(models, version)  # (prunes: lists the versions held, from disk)
    reads.clear()
    assert holder.maybe_reload() and holder.current.version == second.version
    assert reads == [models / "versions" / version]
    assert holder.current.record == read_checkpoint_record(models / "versions" / version)


def test_a_config_claiming_more_than_the_tensors_hold_is_refused_before_it_is_built(
    ckpt: tuple[Path, GRU4Rec],
) -> None:
    """A checkpoint.json that claims 2,000,000 items (the tensors hold 25) is refused by the
    build budget (the tensor file's size), before the model's tensors are allocated: on main
    the worker built the whole model (4.9 GB RSS at 6,000,000 items; see
    bench/results/checkpoint-claims.md), and only then compared shapes."""
    path, _ = ckpt
    meta = json.loads((path / "checkpoint.json").read_text())
    meta["model_config"]["n_items"] = 2_000_000
    (path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"asks for more than \d+ MB .*2000000") as refused:
        load_checkpoint(path)
    assert str(path) in str(refused.value)


@pytest.mark.parametrize("name", ["gru4rec", "gru4rec-onehot", "hrnn", "prnn"])
def test_the_build_budget_admits_every_model(name: str, tmp_path: Path) -> None:
    """Real models of every kind load within the budget (their init's temporaries
    included), with item counts large enough that the slack alone would not cover them."""
    from streamrec.model import checkpoint
    from streamrec.model.hrnn import HRNN
    from streamrec.model.prnn import PRNN

    n = 30_000
    models: dict[str, Callable[[], RegisteredModel]] = {
        "gru4rec": lambda: GRU4Rec(
            GRU4RecConfig(n_items=n, layers=[96], embedding=64, constrained_embedding=False)
        ),
        "gru4rec-onehot": lambda: GRU4Rec(
            GRU4RecConfig(n_items=n, layers=[96], constrained_embedding=False)
        ),
        "hrnn": lambda: HRNN(n, layers=[96], user_layers=[64], variant="all"),
        "prnn": lambda: PRNN(n, [32], arch="parallel", id_hidden=64, feature_hidden=32),
    }
    model = models[name]()
    rec = save_checkpoint(tmp_path / "m", model, name.split("-")[0], [str(j) for j in range(n)])
    file_bytes = (rec.path / checkpoint.TENSORS).stat().st_size
    assert checkpoint.BUILD_BUDGET_FACTOR * file_bytes > checkpoint.BUILD_SLACK_BYTES
    loaded = load_checkpoint(rec.path)
    assert loaded.model.n_items == n
