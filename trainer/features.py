"""Item feature matrices for p-RNN, row-aligned with a model's item index.

Sources:
- a file of vectors (item id -> vector): TSV/CSV (``ItemId`` then one column per dimension, or
  one column holding space/comma separated numbers), ``.npz`` (arrays ``item_ids`` and
  ``vectors``), Parquet (``ItemId`` plus numeric columns or one list column);
- item metadata (``ItemId`` plus text/category columns): multi-hot categories (e.g. MovieLens
  genres) and hashed TF-IDF of text (title, description).

Items without features get a zero vector and ``has_features[row] = False``; with
``missing_flag=True`` one more column holds 1.0 for them, so a model can tell "no features"
from "all-zero features".
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "FeatureMatrix",
    "build_item_features",
    "hashed_tfidf",
    "load_feature_file",
    "load_item_meta",
    "multi_hot",
]

_TOKEN = re.compile(r"[a-z0-9]+")


@dataclass
class FeatureMatrix:
    """Dense per-item features: ``values[row]`` for the item at that row of the item index."""

    name: str
    values: np.ndarray  # float32 [n_items, dim]
    has_features: np.ndarray  # bool [n_items]
    columns: list[str] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    @property
    def coverage(self) -> float:
        return float(self.has_features.mean()) if len(self.has_features) else 0.0

    def with_missing_flag(self) -> FeatureMatrix:
        """A copy with one more column: 1.0 where the item has no features."""
        flag = (~self.has_features).astype(np.float32)[:, None]
        return FeatureMatrix(
            self.name,
            np.concatenate([self.values, flag], axis=1),
            self.has_features.copy(),
            [*self.columns, "__missing__"],
        )


def _read_table(path: Path) -> pd.DataFrame:
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        return pd.read_parquet(path)
    sep = "," if ".csv" in name else "\t"
    return pd.read_csv(path, sep=sep, dtype={0: str}, keep_default_na=False)


def _align(
    name: str,
    ids: Sequence[str],
    vectors: np.ndarray,
    item_index: Mapping[str, int],
    n_items: int,
    columns: list[str],
) -> FeatureMatrix:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(ids) != vectors.shape[0]:
        raise ValueError(f"{name}: expected one vector per item id, got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError(f"{name}: feature vectors contain NaN or infinite values")
    values = np.zeros((n_items, vectors.shape[1]), dtype=np.float32)
    has = np.zeros(n_items, dtype=bool)
    rows = np.array([item_index.get(str(i), -1) for i in ids], dtype=np.int64)
    ok = rows >= 0
    values[rows[ok]] = vectors[ok]
    has[rows[ok]] = True
    return FeatureMatrix(name, values, has, columns)


def load_feature_file(
    path: str | Path, item_index: Mapping[str, int], n_items: int | None = None
) -> FeatureMatrix:
    """Vectors per item id from TSV/CSV/NPZ/Parquet, aligned to ``item_index`` (id -> row).

    Ids not in the index are ignored; items of the index without a vector get zeros.
    """
    path = Path(path)
    n = len(item_index) if n_items is None else n_items
    if not path.exists():
        raise FileNotFoundError(f"feature file not found: {path}")
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "item_ids" not in z or "vectors" not in z:
                raise ValueError(f"{path}: .npz needs arrays 'item_ids' and 'vectors'")
            ids = [str(x) for x in z["item_ids"].tolist()]
            vec = z["vectors"]
        return _align(path.stem, ids, vec, item_index, n, [f"f{i}" for i in range(vec.shape[1])])
    df = _read_table(path)
    if df.shape[1] < 2:
        raise ValueError(f"{path}: need an item id column and at least one value column")
    id_col = "ItemId" if "ItemId" in df.columns else df.columns[0]
    ids = df[id_col].astype(str).tolist()
    rest = [c for c in df.columns if c != id_col]
    if len(rest) == 1 and not pd.api.types.is_numeric_dtype(df[rest[0]]):
        first = df[rest[0]].iloc[0] if len(df) else ""
        if isinstance(first, str):
            vec = np.array(
                [np.array(re.split(r"[ ,;]+", s.strip()), dtype=np.float32) for s in df[rest[0]]]
            )
        else:  # a list/array column (Parquet)
            vec = np.stack([np.asarray(v, dtype=np.float32) for v in df[rest[0]]])
        cols = [f"f{i}" for i in range(vec.shape[1])]
    else:
        try:
            vec = df[rest].to_numpy(dtype=np.float32)
        except ValueError as e:
            raise ValueError(f"{path}: non-numeric feature values ({e})") from e
        cols = [str(c) for c in rest]
    return _align(path.stem, ids, vec, item_index, n, cols)


def load_item_meta(path: str | Path) -> pd.DataFrame:
    """Item metadata table (TSV/CSV/Parquet, gzip ok) with an ``ItemId`` column, as strings."""
    path = Path(path)
    if path.name.lower().endswith((".parquet", ".pq")):
        df = pd.read_parquet(path)
    else:
        sep = "," if ".csv" in path.name.lower() else "\t"
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    if "ItemId" not in df.columns:
        raise ValueError(f"{path}: item metadata needs an 'ItemId' column, has {list(df.columns)}")
    df["ItemId"] = df["ItemId"].astype(str)
    return df


def multi_hot(
    meta: pd.DataFrame,
    column: str,
    item_index: Mapping[str, int],
    n_items: int | None = None,
    sep: str | None = None,
) -> FeatureMatrix:
    """Multi-hot category vectors from ``column`` (categories separated by ``sep``: '|' if the
    column contains one, else whitespace/commas). Category order: sorted, so it is deterministic."""
    n = len(item_index) if n_items is None else n_items
    vals = meta[column].fillna("").astype(str)
    if sep is None:
        sep = "|" if vals.str.contains("|", regex=False).any() else r"[\s,]+"
    cats_per_item = [
        [c for c in re.split(sep if len(sep) > 1 else re.escape(sep), v) if c] for v in vals
    ]
    vocab = sorted({c for cs in cats_per_item for c in cs})
    pos = {c: i for i, c in enumerate(vocab)}
    vec = np.zeros((len(meta), len(vocab)), dtype=np.float32)
    for r, cs in enumerate(cats_per_item):
        for c in cs:
            vec[r, pos[c]] = 1.0
    fm = _align(column, meta["ItemId"].tolist(), vec, item_index, n, vocab)
    fm.has_features &= fm.values.sum(axis=1) > 0
    return fm


def _bucket(token: str, n_features: int) -> int:
    # crc32: stable across processes, unlike Python's salted hash()
    return zlib.crc32(token.encode("utf-8")) % n_features


def hashed_tfidf(
    meta: pd.DataFrame,
    columns: Sequence[str],
    item_index: Mapping[str, int],
    n_features: int = 256,
    n_items: int | None = None,
) -> FeatureMatrix:
    """Hashed TF-IDF of the text in ``columns`` (lower-cased alphanumeric tokens), L2-normalised.

    IDF = log((1 + N) / (1 + df)) + 1 over the metadata rows (smooth IDF, as scikit-learn).
    """
    n = len(item_index) if n_items is None else n_items
    text = meta[list(columns)].fillna("").astype(str).agg(" ".join, axis=1)
    docs = [_TOKEN.findall(t.lower()) for t in text]
    tf = np.zeros((len(docs), n_features), dtype=np.float32)
    for r, toks in enumerate(docs):
        for t in toks:
            tf[r, _bucket(t, n_features)] += 1.0
    dfreq = (tf > 0).sum(axis=0)
    idf = np.log((1.0 + len(docs)) / (1.0 + dfreq)) + 1.0
    x = tf * idf.astype(np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    fm = _align(
        "tfidf:" + "+".join(columns),
        meta["ItemId"].tolist(),
        x,
        item_index,
        n,
        [f"h{i}" for i in range(n_features)],
    )
    fm.has_features &= fm.values.any(axis=1)
    return fm


def build_item_features(
    item_index: Mapping[str, int],
    n_items: int | None = None,
    features_path: str | Path | None = None,
    item_meta_path: str | Path | None = None,
    category_columns: Sequence[str] = ("Genres",),
    text_columns: Sequence[str] = ("Title",),
    tfidf_dim: int = 256,
    missing_flag: bool = True,
) -> list[FeatureMatrix]:
    """All feature matrices for p-RNN: one per source (vector file, each category column, text).

    Metadata columns that are absent are skipped; at least one matrix must result.
    """
    out: list[FeatureMatrix] = []
    if features_path is not None:
        out.append(load_feature_file(features_path, item_index, n_items))
    if item_meta_path is not None:
        meta = load_item_meta(item_meta_path)
        for c in category_columns:
            if c in meta.columns:
                out.append(multi_hot(meta, c, item_index, n_items))
        cols = [c for c in text_columns if c in meta.columns]
        if cols:
            out.append(hashed_tfidf(meta, cols, item_index, tfidf_dim, n_items))
    if not out:
        raise ValueError(
            "no item features: give a features file or item metadata with "
            f"{list(category_columns)} / {list(text_columns)} columns"
        )
    return [f.with_missing_flag() for f in out] if missing_flag else out
