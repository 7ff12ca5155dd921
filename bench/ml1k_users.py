"""The ML-1M 1k-user validation split of bench/results/accuracy-beyond-gru4rec.md with each
session's ``UserId`` kept (HRNN and p-RNN need it): 1,000 users drawn with seed 0, sessions at
30-minute gaps, the project's preprocessing, training up to 2001-01-01 and, inside it, the
validation split at 2000-12-01 (the sessions of ``ml1k_train_tr`` / ``ml1k_train_valid``,
plus the user column). The test split is the same users' sessions from 2001-01-01, trained on
everything before (``ml1k_users_train_full`` / ``ml1k_users_test``).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/ml1k_users.py \\
        --ratings /work/shared/data/movielens-1m/ratings.tsv.gz --out-dir /tmp/ml1k
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamrec.data.clicklog import sessionize
from trainer.data import preprocess, split_by_time


def save(df: pd.DataFrame, path: Path) -> None:
    df = df[["UserId", "SessionId", "ItemId", "Time"]].astype({"SessionId": "int64"})
    df = df.sort_values(["SessionId", "Time"], kind="stable")
    df.to_csv(path, sep="\t", index=False)
    print(path, len(df), "events", df.SessionId.nunique(), "sessions", df.UserId.nunique(), "users")


def ml1k_user_splits(r: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The four files of the module docstring, by name, from ML-1M's ratings (``UserId`` and
    ``ItemId`` read as strings)."""
    pick = np.random.default_rng(0).choice(np.sort(r.UserId.unique()), 1000, replace=False)
    r = r[r.UserId.isin(pick)][["UserId", "ItemId", "Time"]].astype({"Time": float})
    s = preprocess(sessionize(r, 1800))
    codes, _ = pd.factorize(s.SessionId)
    s = s.assign(SessionId=codes + 1)
    train, test = split_by_time(s, (s.Time.max() - pd.Timestamp("2001-01-01").timestamp()) / 86400)
    cut = pd.Timestamp("2000-12-01").timestamp()
    tr, valid = split_by_time(train, (train.Time.max() - cut) / 86400)
    return {
        "ml1k_users_train_tr.tsv": tr,
        "ml1k_users_train_valid.tsv": valid,
        "ml1k_users_train_full.tsv": train,
        "ml1k_users_test.tsv": test,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratings", type=Path, required=True)
    ap.add_argument("--out-dir", type=Path, required=True)
    a = ap.parse_args()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    ratings = pd.read_csv(a.ratings, sep="\t", dtype={"UserId": str, "ItemId": str})
    for name, df in ml1k_user_splits(ratings).items():
        save(df, a.out_dir / name)


if __name__ == "__main__":
    main()
