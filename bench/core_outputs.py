"""What the serving digest covers, field by field: explain a changed digest.

``core_overhead.py --digest`` hashes the outputs and states of a mixed stream; when a change
moves the digest, this script says which fields moved. It writes every recommendation (less
``emitted_at``), dead letter (less ``received_at``), batch's stats and final session and user
state (decoded, every attribute) of the same stream as one JSON line each, floats exact
(``repr``) and the model version replaced by ``V``. Run it under two trees and compare:

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/core_outputs.py after.jsonl
    (cd /tmp/main && OMP_NUM_THREADS=1 PYTHONPATH=. python bench/core_outputs.py before.jsonl)
    python bench/core_outputs.py --compare before.jsonl after.jsonl

The comparison prints, per kind of line, how many lines there are and which fields differ
in how many of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from core_overhead import T0, mixed_records
from serve_bench import make_checkpoint

from streamrec.serving.config import CoreConfig
from streamrec.serving.pipeline import process_batch
from streamrec.serving.served_model import ServingModel
from streamrec.serving.state import SessionState, UserState
from streamrec.serving.state_store import StateStore


def _plain(x: Any, version: str) -> Any:
    if isinstance(x, float):
        return repr(x)
    if isinstance(x, list | tuple):
        return [_plain(y, version) for y in x]
    if isinstance(x, dict):
        return {k: _plain(v, version) for k, v in x.items()}
    if hasattr(x, "tolist"):
        return _plain(x.tolist(), version)
    if x == version:
        return "V"
    return x


def _attributes(state: Any) -> dict[str, Any]:
    names = [a for a in dir(state) if not a.startswith("_")]
    return {a: getattr(state, a) for a in names if not callable(getattr(state, a))}


def dump(path: Path, events: int, batch: int) -> None:
    torch.set_num_threads(1)
    ckpt = make_checkpoint(Path(tempfile.mkdtemp(prefix="core-outputs-")) / "model")
    model = ServingModel.from_checkpoint(ckpt, "cpu", top_k=20)
    version = model.version
    store = StateStore()
    recs = mixed_records(events)
    with path.open("w") as out:

        def line(kind: str, value: Any) -> None:
            out.write(json.dumps([kind, _plain(value, version)], sort_keys=True, default=str))
            out.write("\n")

        for i in range(0, len(recs), batch):
            res = process_batch(recs[i : i + batch], store, model, CoreConfig(), now=T0)
            for _, value in res.recommendation_values():
                rec = json.loads(value)
                rec.pop("emitted_at", None)  # wall time
                line("recommendation", rec)
            for d in res.dead_letters:
                line("dead_letter", json.loads(d.model_dump_json(exclude={"received_at"})))
            line("stats", dict(sorted(res.stats.items())))
        for kind, table, cls in (
            ("session", store.sessions, SessionState),
            ("user", store.users, UserState),
        ):
            for key in sorted(table):
                line(kind, {"key": key, **_attributes(cls.from_bytes(table[key]))})


def compare(before: Path, after: Path) -> None:
    a = [json.loads(x) for x in before.read_text().splitlines()]
    b = [json.loads(x) for x in after.read_text().splitlines()]
    if len(a) != len(b):
        sys.exit(f"{len(a)} lines before, {len(b)} after: the streams differ")
    lines: Counter[str] = Counter()
    fields: dict[str, Counter[str]] = {}
    for (kind, x), (kind_b, y) in zip(a, b, strict=True):
        if kind != kind_b:
            sys.exit(f"line kinds differ: {kind} / {kind_b}")
        lines[kind] += 1
        moved = fields.setdefault(kind, Counter())
        for name in sorted(set(x) | set(y)):
            if x.get(name) != y.get(name):
                moved[name] += 1
    for kind, n in lines.items():
        moved = fields[kind]
        what = ", ".join(f"{f} in {c:,}" for f, c in moved.items()) or "nothing"
        print(f"{kind}: {n:,} lines; differ: {what}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("paths", type=Path, nargs="+")
    ap.add_argument("--compare", action="store_true", help="compare two dumps")
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=256)
    a = ap.parse_args()
    if a.compare:
        compare(*a.paths)
    else:
        dump(a.paths[0], a.events, a.batch)


if __name__ == "__main__":
    main()
