"""What a registry writer can do to a worker (issue 19): a pointer that cannot be read, a
pointer or a rollback out of the registry, another model under the served version's name.

The worker keeps serving the model it has, logs each problem once and counts it
(``ModelHolder.refusals``, the ``streamrec_model_refusals`` metric), and follows a valid
pointer again later. The broker test at the end runs the same sequence against a worker
process.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamrec.loop import registry
from streamrec.model.checkpoint import CheckpointRecord, save_checkpoint
from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig
from streamrec.serving.served_model import (
    REFUSED_POINTER,
    REFUSED_VERSION_REUSED,
    ModelHolder,
    ServingModel,
)

N_ITEMS = 8


def _publish(models: Path, seed: int, name: str) -> str:
    model = GRU4Rec(GRU4RecConfig(n_items=N_ITEMS, layers=[4]), seed=seed)
    rec = save_checkpoint(
        registry.staging_dir(models, name), model, "gru4rec", [f"i{j}" for j in range(N_ITEMS)]
    )
    version = registry.add_version(models, rec)
    registry.publish(models, version)
    return version


def _holder(models: Path) -> ModelHolder:
    path = registry.resolve(models)
    assert path is not None
    return ModelHolder(ServingModel.from_checkpoint(path, "cpu"), watch_dir=models, device="cpu")


def _point(models: Path, content: bytes) -> None:
    """Write CURRENT as a registry writer might (not through publish)."""
    pointer = models / registry.POINTER
    if pointer.is_dir():
        pointer.rmdir()
    pointer.write_bytes(content)


def test_an_unreadable_pointer_keeps_the_served_model_logs_once_and_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = tmp_path / "models"
    v1 = _publish(models, 1, "a")
    holder = _holder(models)
    v2 = _publish(models, 2, "b")
    caplog.set_level(logging.ERROR, logger="streamrec.serving.served_model")
    # not UTF-8: current_version used to raise UnicodeDecodeError out of the loader thread
    _point(models, b"\xff\xfe\xfa" + v2.encode())
    assert holder.prepare_reload() is None
    assert holder.prepare_reload() is None  # the next poll: counted and logged once
    assert holder.current.version == v1 and holder.refusals[REFUSED_POINTER] == 1
    assert len(caplog.records) == 1 and "not UTF-8" in caplog.text
    # a directory: IsADirectoryError
    (models / registry.POINTER).unlink()
    (models / registry.POINTER).mkdir()
    assert holder.prepare_reload() is None and holder.current.version == v1
    assert holder.refusals[REFUSED_POINTER] == 2 and "cannot be read" in caplog.text
    # a valid pointer later is followed
    _point(models, v2.encode() + b"\n")
    assert holder.maybe_reload() and holder.current.version == v2
    # and a problem seen again after a good poll is logged again
    _point(models, b"\xff")
    assert holder.prepare_reload() is None and holder.refusals[REFUSED_POINTER] == 3


def test_a_pointer_or_a_rollback_out_of_the_registry_is_refused(tmp_path: Path) -> None:
    from trainer.cli import main

    models = tmp_path / "reg" / "models"
    v1 = _publish(models, 1, "a")
    holder = _holder(models)
    # a valid checkpoint outside the registry, two levels up from versions/
    outside = tmp_path / "reg" / "outside" / "ckpt"
    model = GRU4Rec(GRU4RecConfig(n_items=N_ITEMS, layers=[4]), seed=9)
    save_checkpoint(outside, model, "gru4rec", [f"i{j}" for j in range(N_ITEMS)])
    assert (models / registry.VERSIONS / "../../outside/ckpt" / "checkpoint.json").is_file()
    for name in ("../../outside/ckpt", "/" + str(outside), ".staging-x", "a b", "v\x00"):
        _point(models, name.encode())
        with pytest.raises(registry.RegistryError, match="not a version name"):
            registry.resolve(models)
        assert holder.prepare_reload() is None and holder.current.version == v1
    assert holder.refusals[REFUSED_POINTER] == 5
    # a version directory that links out of versions/
    (models / registry.VERSIONS / "linked").symlink_to(outside)
    _point(models, b"linked")
    with pytest.raises(registry.RegistryError, match="links out of"):
        registry.resolve(models)
    assert holder.prepare_reload() is None and holder.current.version == v1
    assert "linked" not in [v.version for v in registry.list_versions(models)]
    # the rollback command refuses it and leaves the pointer where it was
    _point(models, v1.encode())
    run = CliRunner()
    for name in ("../../outside/ckpt", "linked"):
        out = run.invoke(main, ["models", "rollback", "--models", str(models), name])
        assert out.exit_code != 0 and "Error" in out.output, out.output
        assert registry.current_version(models) == v1
    with pytest.raises(registry.RegistryError):
        registry.publish(models, "../../outside/ckpt")
    # and a checkpoint whose version is a path is not added under it
    record = save_checkpoint(
        registry.staging_dir(models, "c"), model, "gru4rec", [f"i{j}" for j in range(N_ITEMS)]
    )
    forged = CheckpointRecord(**{**record.__dict__, "version": "../../outside/forged"})
    with pytest.raises(registry.RegistryError, match="not a version name"):
        registry.add_version(models, forged)
    assert not (tmp_path / "reg" / "outside" / "forged").exists()


def _same_version_elsewhere(models: Path, version: str, seed: int, name: str) -> Path:
    """``versions/<name>``: a checkpoint whose checkpoint.json says ``version``, with the
    weights of ``seed`` (the served one's when seed is None)."""
    target = models / registry.VERSIONS / name
    model = GRU4Rec(GRU4RecConfig(n_items=N_ITEMS, layers=[4]), seed=seed)
    rec = save_checkpoint(target, model, "gru4rec", [f"i{j}" for j in range(N_ITEMS)])
    meta = rec.to_json()
    meta["version"] = version
    import json

    (target / "checkpoint.json").write_text(json.dumps(meta))
    return target


def test_another_model_under_the_served_version_name_is_refused_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = tmp_path / "models"
    v1 = _publish(models, 1, "a")
    holder = _holder(models)
    served_sha = holder.current.record.tensor_sha256 if holder.current.record else ""
    caplog.set_level(logging.ERROR, logger="streamrec.serving.served_model")
    # the same model copied under another directory name: nothing to do, nothing said
    copy = models / registry.VERSIONS / "copy"
    shutil.copytree(models / registry.VERSIONS / v1, copy)
    _point(models, b"copy")
    assert holder.prepare_reload() is None and not holder.refusals and not caplog.records
    # another model (other weights) that calls itself v1
    _same_version_elsewhere(models, v1, seed=2, name="other")
    _point(models, b"other")
    for _ in range(3):
        assert holder.prepare_reload() is None
    assert holder.current.version == v1 and holder.current.record is not None
    assert holder.current.record.tensor_sha256 == served_sha  # the served weights stayed
    assert holder.refusals[REFUSED_VERSION_REUSED] == 1
    assert len(caplog.records) == 1 and "another model" in caplog.text and v1 in caplog.text


# ------------------------------------------------------------------------ through a worker


@pytest.mark.broker
@pytest.mark.slow
def test_a_worker_survives_every_bad_pointer_and_follows_a_good_one(
    kafka_bootstrap: str, unique_name, tmp_path: Path
) -> None:
    """The sequence a registry writer could produce, against a worker process: answers stay
    with v1 through a non-UTF-8 pointer, a directory, a path out of the registry and another
    model named v1, each counted once; a good pointer to v2 is then served."""
    import time

    from test_worker_e2e import Service, metric

    models = tmp_path / "models"
    v1 = _publish(models, 1, "a")
    v2 = _publish(models, 2, "b")
    _point(models, v1.encode())
    outside = tmp_path / "outside" / "ckpt"
    model = GRU4Rec(GRU4RecConfig(n_items=N_ITEMS, layers=[4]), seed=3)
    save_checkpoint(outside, model, "gru4rec", [f"i{j}" for j in range(N_ITEMS)])
    _same_version_elsewhere(models, v1, seed=4, name="other")
    with Service(kafka_bootstrap, unique_name, models, tmp_path) as svc:
        svc.settings["model.reload_interval_s"] = 0.2
        w = svc.start_worker()
        sent: set[str] = set()

        def answered_with(version: str, tag: str) -> None:
            """A click after each pointer change: answered, with ``version``."""
            svc.produce([(f"s-{tag}", _click(f"s-{tag}", "i1"))])
            first = {r["session_id"]: r for r in reversed(svc.recommendations())}
            deadline = time.monotonic() + 120
            while f"s-{tag}" not in first:
                assert w.proc.poll() is None, w.log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, w.log_path.read_text()[-3000:]
                time.sleep(0.5)
                first = {r["session_id"]: r for r in reversed(svc.recommendations())}
            assert first[f"s-{tag}"]["model_version"] == version, tag
            sent.add(tag)

        answered_with(v1, "start")
        bad: list[tuple[str, bytes | None]] = [
            ("bytes", b"\xff\xfe\xfa"),
            ("dir", None),
            ("outside", os.path.relpath(outside, models / registry.VERSIONS).encode()),
            ("reused", b"other"),
        ]
        for tag, content in bad:
            pointer = models / registry.POINTER
            if content is None:
                pointer.unlink()
                pointer.mkdir()
            else:
                _point(models, content)
            time.sleep(1.0)  # several reload polls
            answered_with(v1, tag)
        assert metric(svc, w, "streamrec_model_refusals_total") == 4
        _point(models, v2.encode())
        deadline = time.monotonic() + 60
        probe = 0
        while True:  # the swap happens on a later poll: probe until v2 answers
            tag = f"after{probe}"
            svc.produce([(f"s-{tag}", _click(f"s-{tag}", "i1"))])
            time.sleep(1.0)
            recs = {r["session_id"]: r for r in svc.recommendations()}
            if recs.get(f"s-{tag}", {}).get("model_version") == v2:
                break
            assert time.monotonic() < deadline, w.log_path.read_text()[-3000:]
            probe += 1
        assert w.proc.poll() is None


def _click(session: str, item: str) -> bytes:
    from streamrec.testing import click

    return click(session, item)
