"""A small model registry: one checkpoint directory per version, atomic alias pointers.

Layout of ``MODELS``::

    MODELS/versions/<version>/     checkpoint directories (streamrec.model.checkpoint)
    MODELS/CURRENT                 the champion: the published version's name (replaced atomically)
    MODELS/CHALLENGER              the challenger's name, when there is one (the same way)
    MODELS/retrain-log.jsonl       one JSON line per retrain cycle (trainer.retrain) and per
                                   rollback (``"event": "rollback"``)
    MODELS/registry-log.jsonl      one JSON line per alias change: what, by whom, why

Two aliases (MLflow's names): ``champion`` is what is published (``CURRENT``, as before, so
registries written before aliases read the same) and ``challenger`` the candidate served
beside it (A/B or shadow, ``streamrec worker --challenger-share``/``--shadow``). Workers
(``streamrec worker --model MODELS``) follow both; a plain checkpoint directory keeps working
as before. Publishing keeps the last ``keep`` versions, never one an alias names nor the
previous champion (a rollback's target). No trainer import here: the workers use it.

A version is a name inside ``versions/`` and nothing else (:func:`check_version`): an alias
pointer, a rollback or a checkpoint's ``version`` that names a path (``../../elsewhere``), a
hidden directory or a link out of ``versions/`` is refused with :class:`RegistryError`, and so
is a pointer that cannot be read as text. A worker then keeps the model it serves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streamrec.errors import StreamrecError
from streamrec.loop.files import Files
from streamrec.model.checkpoint import (
    META,
    CheckpointError,
    CheckpointRecord,
    read_checkpoint_record,
)

VERSIONS = "versions"
POINTER = "CURRENT"
TMP_POINTER = f".{POINTER}.tmp"
LOG = "retrain-log.jsonl"
ALIAS_LOG = "registry-log.jsonl"
DEFAULT_KEEP = 5
#: what a version may be called: letters, digits and ``._-``, not starting with a dot (the
#: staging directories) and at most 128 characters; ``save_checkpoint`` makes
#: ``<UTC time>-<12 hex digits>``
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CHAMPION, CHALLENGER = "champion", "challenger"
#: alias -> the file that names its version
POINTERS = {CHAMPION: POINTER, CHALLENGER: "CHALLENGER"}


class RegistryError(StreamrecError):
    """A registry operation that cannot be done (unknown version, broken pointer, ...)."""


@dataclass(frozen=True)
class VersionInfo:
    version: str
    path: Path
    created_at: str
    model_name: str
    n_items: int
    metrics: dict[str, Any]
    published: bool
    #: the aliases that name it (champion, challenger)
    aliases: tuple[str, ...] = ()


def is_registry(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return (p / VERSIONS).is_dir() or (p / POINTER).exists()


def require_registry(path: str | os.PathLike[str]) -> Path:
    """``path`` as a registry, or a RegistryError that says what it is instead (a mistyped
    path must not read as an empty registry)."""
    p = Path(path)
    if is_registry(p):
        return p
    if not p.exists():
        raise RegistryError(f"{path}: no such directory (a model registry is made by "
                            "`trainer retrain --models DIR`)")  # fmt: skip
    raise RegistryError(
        f"{path} is not a model registry (no {VERSIONS}/ and no {POINTER} file in it; "
        "a plain checkpoint directory is read by `trainer evaluate --model`)"
    )


#: The steps of the registry's writes (the pointer's atomic replacement, a version's rename):
#: a test sets its own here to fail a step or to read the registry in the middle of one.
files = Files()


def _pointer(alias: str) -> str:
    try:
        return POINTERS[alias]
    except KeyError:
        raise RegistryError(f"unknown alias {alias!r} (aliases: {', '.join(POINTERS)})") from None


def check_version(name: str, where: str) -> str:
    """``name`` if it is a version name (:data:`VERSION_NAME`), else :class:`RegistryError`
    saying ``where`` it came from."""
    if not VERSION_NAME.fullmatch(name):
        raise RegistryError(
            f"{where}: {name[:200]!r} is not a version name (letters, digits and ._- not "
            "starting with a dot: a name inside versions/, never a path)"
        )
    return name


def alias_version(models: str | os.PathLike[str], alias: str = CHAMPION) -> str | None:
    """The version an alias names, or None (nothing published, no challenger).

    :class:`RegistryError` when its pointer cannot be read (a directory, no permission), is
    not UTF-8 text, or does not hold a version name."""
    pointer = Path(models) / _pointer(alias)
    try:
        data = pointer.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RegistryError(f"{pointer} cannot be read: {exc.strerror or exc}") from None
    try:
        name = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise RegistryError(f"{pointer} is not UTF-8 text ({len(data)} bytes)") from None
    return check_version(name, str(pointer)) if name else None


def version_dir(models: str | os.PathLike[str], version: str) -> Path:
    """``versions/<version>`` of the registry, checked to be a version name and to lie inside
    ``versions/`` (a link out of it is refused)."""
    base = Path(models) / VERSIONS
    path = base / check_version(version, f"{models}: version")
    if path.is_symlink() and path.resolve().parent != base.resolve():
        raise RegistryError(f"{models}: {path} links out of {VERSIONS}/ ({path.resolve()})")
    return path


def current_version(models: str | os.PathLike[str]) -> str | None:
    """The published version's name (the champion), or None when nothing is published yet."""
    return alias_version(models, CHAMPION)


def resolve(models: str | os.PathLike[str], alias: str = CHAMPION) -> Path | None:
    """The checkpoint directory an alias names (default: the published one), or None."""
    name = alias_version(models, alias)
    if name is None:
        return None
    path = version_dir(models, name)
    if not (path / META).is_file():
        raise RegistryError(f"{models}: {_pointer(alias)} names {name!r}, which has no checkpoint")
    return path


def _set_pointer(models: Path, version: str | None, alias: str = CHAMPION) -> None:
    """Point ``alias`` at ``version`` (None: remove the alias), atomically."""
    name = _pointer(alias)
    if version is None:
        if (models / name).exists():
            files.remove(str(models / name))
            files.sync_dir(str(models))
        return
    if (models / name).is_dir():
        raise RegistryError(f"{models / name} is a directory: remove it, then publish again")
    # a temporary file renamed over the pointer: readers see the old or the new name, never
    # an empty or half-written one, and a crash leaves the old one
    if name != POINTER:
        data = (version + "\n").encode()
        files.write_atomic(str(models / name), data, str(models / f".{name}.tmp"))
        return
    files.write_atomic(str(models / POINTER), (version + "\n").encode(), str(models / TMP_POINTER))


def staging_dir(models: str | os.PathLike[str], name: str) -> Path:
    """A place to write a candidate checkpoint before :func:`publish` (same filesystem)."""
    p = Path(models) / VERSIONS / f".staging-{name}"
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def add_version(models: str | os.PathLike[str], checkpoint: CheckpointRecord) -> str:
    """Move a finished checkpoint directory (``save_checkpoint``'s record of it) into
    ``versions/<its version>``; returns the version."""
    target = version_dir(models, checkpoint.version)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        raise RegistryError(f"{models}: version {checkpoint.version} exists already")
    files.rename(str(checkpoint.path), str(target))
    files.sync_dir(str(target.parent))
    return checkpoint.version


def publish(
    models: str | os.PathLike[str],
    version: str,
    keep: int = DEFAULT_KEEP,
    *,
    by: str = "publish",
    reason: str | None = None,
) -> list[str]:
    """Make ``version`` the champion (``CURRENT``), then drop all but the newest ``keep``
    versions (never one an alias names, nor the previous champion).

    Returns the versions removed.
    """
    set_alias(models, CHAMPION, version, by=by, reason=reason)
    return prune(models, keep)


def prune(models: str | os.PathLike[str], keep: int = DEFAULT_KEEP) -> list[str]:
    kept = {v for v in (alias_version(models, a) for a in POINTERS) if v is not None}
    previous = previous_champion(models)
    if previous is not None:
        kept.add(previous)  # what a rollback of the champion goes back to
    infos = list_versions(models)  # oldest first
    drop = [v for v in infos[: max(0, len(infos) - max(keep, 1))] if v.version not in kept]
    for v in drop:
        shutil.rmtree(v.path, ignore_errors=True)
    return [v.version for v in drop]


def list_versions(models: str | os.PathLike[str]) -> list[VersionInfo]:
    """The versions held, oldest first (by creation time, then name)."""
    m = Path(models)
    current = current_version(m)
    named = {a: alias_version(m, a) for a in POINTERS}
    out = []
    for d in sorted((m / VERSIONS).glob("*")) if (m / VERSIONS).is_dir() else []:
        # staging directories, names that are no version, links out of versions/: never held
        if not VERSION_NAME.fullmatch(d.name) or not (d / META).is_file():
            continue
        if d.is_symlink() and d.resolve().parent != (m / VERSIONS).resolve():
            continue
        try:
            rec = read_checkpoint_record(d)
        except CheckpointError:  # a broken directory is listed by `show`, never served
            continue
        out.append(
            VersionInfo(
                version=d.name,
                path=d,
                created_at=rec.created_at,
                model_name=rec.model_name,
                n_items=rec.n_items,
                metrics=dict(rec.metrics),
                published=d.name == current,
                aliases=tuple(a for a, v in named.items() if v == d.name),
            )
        )
    return sorted(out, key=lambda v: (v.created_at, v.version))


def show(models: str | os.PathLike[str], version: str) -> dict[str, Any]:
    """One version's ``checkpoint.json`` without the item ids, with their number, its path and
    whether it is published."""
    path = version_dir(models, version)
    rec = read_checkpoint_record(path)
    meta = rec.to_json()
    del meta["item_ids"]
    return {
        **meta,
        "n_items": rec.n_items,
        "path": str(path),
        "published": version == current_version(models),
        "aliases": [a for a in POINTERS if alias_version(models, a) == version],
    }


def _check_held(models: str | os.PathLike[str], version: str) -> None:
    if not (version_dir(models, version) / META).is_file():
        held = ", ".join(v.version for v in list_versions(models)) or "none"
        raise RegistryError(f"{models}: no version {version!r} (held: {held})")


def set_alias(
    models: str | os.PathLike[str],
    alias: str,
    version: str | None,
    *,
    by: str = "alias",
    reason: str | None = None,
) -> dict[str, Any] | None:
    """Point ``alias`` at ``version`` (None: remove it; the champion cannot be removed) and
    record the change in ``registry-log.jsonl``; returns that record (None: no change). A
    challenger made champion stops being the challenger."""
    m = Path(models)
    _pointer(alias)
    if version is None and alias == CHAMPION:
        raise RegistryError("the champion cannot be removed, only replaced")
    if version is not None:
        _check_held(m, version)
    before = alias_version(m, alias)
    if before == version:
        return None
    _set_pointer(m, version, alias)
    record: dict[str, Any] = {
        "time": datetime.now(UTC).isoformat(),
        "event": alias,
        "version": version,
        "previous": before,
        "by": by,
        "reason": reason,
    }
    if alias == CHAMPION and version is not None and alias_version(m, CHALLENGER) == version:
        _set_pointer(m, None, CHALLENGER)
        record["challenger_cleared"] = True
    append_alias_log(m, record)
    return record


def rollback(
    models: str | os.PathLike[str], version: str, *, by: str = "rollback", reason: str | None = None
) -> dict[str, Any]:
    """Make an older version that is still held the champion again (pruning nothing): the
    alias change is in ``registry-log.jsonl``, and the rollback is appended to the retrain
    log as well; returns that record."""
    m = require_registry(models)
    _check_held(m, version)
    before = current_version(m)
    set_alias(m, CHAMPION, version, by=by, reason=reason)
    record = {
        "time": datetime.now(UTC).isoformat(),
        "event": "rollback",
        "from": before,
        "to": version,
        "by": by,
        "reason": reason,
        "decision": {"published": True, "version": version, "reason": "rollback"},
    }
    append_log(m, record)
    return record


def promote(
    models: str | os.PathLike[str], *, by: str = "promote", reason: str | None = None
) -> dict[str, Any]:
    """The challenger becomes the champion (and is no longer the challenger)."""
    challenger = alias_version(models, CHALLENGER)
    if challenger is None:
        raise RegistryError(f"{models}: no challenger to promote")
    record = set_alias(models, CHAMPION, challenger, by=by, reason=reason)
    if record is None:  # it was the champion already: only the challenger alias goes
        set_alias(models, CHALLENGER, None, by=by, reason=reason)
        record = {"event": CHAMPION, "version": challenger, "previous": challenger}
    return record


def append_alias_log(models: str | os.PathLike[str], record: dict[str, Any]) -> None:
    _append_jsonl(Path(models) / ALIAS_LOG, record)


def read_alias_log(models: str | os.PathLike[str]) -> list[dict[str, Any]]:
    return _read_jsonl(Path(models) / ALIAS_LOG)


def champion_changes(models: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The champion's changes recorded in ``registry-log.jsonl``, oldest first."""
    return [r for r in read_alias_log(models) if r.get("event") == CHAMPION]


def previous_champion(models: str | os.PathLike[str]) -> str | None:
    """The champion before the current one (what a rollback goes back to), if recorded."""
    changes = champion_changes(models)
    return changes[-1].get("previous") if changes else None


def append_log(models: str | os.PathLike[str], record: dict[str, Any]) -> None:
    _append_jsonl(Path(models) / LOG, record)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_log(models: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of the log: retrain cycles and rollbacks, oldest first."""
    return _read_jsonl(Path(models) / LOG)


def read_cycles(models: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The retrain cycles of the log (rollbacks left out), oldest first."""
    return [r for r in read_log(models) if r.get("event", "retrain") == "retrain"]


def cycle_summary(record: Mapping[str, Any]) -> str:
    """One line for a retrain cycle's record: the decision, then the candidate's and the
    current model's figures on the same holdout predictions."""
    metric = str(record.get("metric", "recall@20"))
    m = record.get("metrics") or {}
    current = record.get("current_version")
    decision = record.get("decision") or {}

    def figure(arm: str) -> str:
        v = (m.get(arm) or {}).get(metric)
        return "-" if v is None else f"{float(v):.4f}"

    published = bool(decision.get("published"))
    head = f"published {decision.get('version')}" if published else f"kept {current or 'nothing'}"
    figures = f"candidate {metric} {figure('candidate')}"
    figures += f" vs current {figure('current')} ({current})" if current else (
        " (nothing was published before)")  # fmt: skip
    n = m.get("holdout_predictions")
    if n is not None:
        figures += f" on {int(n):,} holdout predictions"
    return f"{head}: {figures}" + ("" if published else f"; why: {decision.get('reason')}")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
