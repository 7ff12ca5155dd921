"""A click log over a large catalogue from the project's generator (``generate_clicks``: items
in topics, Zipf popularity within a topic, sparse successors, sessions), split into train and
test by session start time (the newest ``--test-sessions`` sessions are the test).

The defaults give a log whose training part holds about a million distinct items (the catalogue
of a model trained on it): 1.4M items in 2,000 topics, Zipf exponent 0.5, 700,000 sessions
(about 4.2M clicks). Items never clicked in training are not in the model.

    PYTHONPATH=. .venv/bin/python bench/catalogue_log.py --out /tmp/catalogue-1m
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from streamrec.data.synthetic import generate_clicks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=1_400_000)
    ap.add_argument("--topics", type=int, default=2_000)
    ap.add_argument("--sessions", type=int, default=700_000)
    ap.add_argument("--zipf", type=float, default=0.5)
    ap.add_argument("--test-sessions", type=int, default=3_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    df = generate_clicks(
        n_sessions=args.sessions,
        n_items=args.items,
        n_topics=args.topics,
        zipf_a=args.zipf,
        seed=args.seed,
    )
    gen_s = time.perf_counter() - t0
    start = df.groupby("SessionId", sort=False)["Time"].min().sort_values()
    test_ids = set(start.index[-args.test_sessions :])
    is_test = df["SessionId"].isin(test_ids)
    args.out.mkdir(parents=True, exist_ok=True)
    train, test = df[~is_test], df[is_test]
    train.to_csv(args.out / "train.tsv.gz", sep="\t", index=False)
    test.to_csv(args.out / "test.tsv.gz", sep="\t", index=False)
    stats = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "train_events": len(train),
        "train_items": int(train["ItemId"].nunique()),
        "test_events": len(test),
        "test_sessions": int(test["SessionId"].nunique()),
        "generate_seconds": round(gen_s, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    (args.out / "stats.json").write_text(json.dumps(stats, indent=1))
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
