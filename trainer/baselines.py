"""The baselines of the GRU4Rec paper (ICLR 2016), behind the step API of docs/architecture.md.

- ``pop``: training popularity (event counts), the same list for everyone.
- ``s-pop``: how often the item occurred in the session so far, popularity breaking ties
  (the official ``PersonalPop``: session count + pop/(pop+1)). The state is a ring buffer of the
  session's last ``history`` item rows; ``run_baseline`` sizes it to the longest test session, so
  the evaluation is exact (longer sessions in serving count only their last ``history`` clicks).
- ``item-knn``: the last item's most similar items, similarity = co-occurrence in sessions
  normalised as a regularised cosine, as in the official ``baselines.py`` (``CoOccurence`` /
  ``Cosine``): ``sim(i, j) = co(i, j) / ((supp_i + lambda)**alpha * (supp_j + lambda)**(1-alpha))``
  with ``co(i, j) = sum over sessions of count_i * count_j`` (i != j), ``supp`` = event count,
  ``alpha = 0.5`` (cosine), ``lambda = 20``, top ``n_sims = 100`` neighbours kept per item.
- ``bpr-mf``: matrix factorisation trained with BPR, sessions as users; at prediction time a
  session is the mean of the item vectors seen so far (as in the paper). The state is the sum of
  those vectors and their count, so it is exact and compact.

Scores are float32. Popularity tie-breakers use the dense rank of the popularity (so items of
equal popularity stay tied and the values are exactly representable).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping
from typing import Any, Self

import numpy as np
import pandas as pd
import torch

from streamrec.model.items import build_item_index
from trainer.batching import session_arrays
from trainer.evaluate import evaluate_next_item

SESSION, ITEM, TIME = "SessionId", "ItemId", "Time"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sorted_item_rows(train_df: pd.DataFrame) -> dict[str, int]:
    """Item id -> row, rows in sorted id order (deterministic, independent of row order)."""
    return build_item_index(sorted(pd.unique(train_df[ITEM].astype(str))))[1]


def _dense_pop_score(pop: np.ndarray) -> np.ndarray:
    """Popularity mapped into [0, 1): dense rank / (n distinct + 1), equal counts stay equal."""
    uniq, inv = np.unique(pop, return_inverse=True)
    return (inv + 1) / (len(uniq) + 1)


class _Baseline:
    """Shared step-API plumbing; subclasses set n_items, state_dim and implement _scores."""

    user_state_dim = 0
    training = False

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.n_items = 0
        self.state_dim = 1

    def eval(self) -> _Baseline:
        return self

    def initial_user_state(self, batch_size: int) -> None:
        return None

    def end_session(
        self, user_state: torch.Tensor | None, final_state: torch.Tensor
    ) -> torch.Tensor | None:
        return user_state

    def initial_state(self, user_state: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        return torch.zeros(batch_size, self.state_dim, device=self.device)

    def _advance(self, item_rows: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return state

    def _scores(self, state: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fit(self, train_df: pd.DataFrame, item_index: Mapping[str, int]) -> Self:
        """Learn from a click log (``item_index``: item id -> row); returns the model."""
        raise NotImplementedError

    def step(
        self, item_rows: torch.Tensor, state: torch.Tensor, user_state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        item_rows = item_rows.to(self.device)
        known = item_rows >= 0
        new = self._advance(item_rows.clamp(min=0), state)
        # unknown items (row < 0) leave the state unchanged
        new = torch.where(known.unsqueeze(1), new, state)
        return new, self._scores(new)

    def _rows(self, df: pd.DataFrame, item_index: Mapping[str, int]) -> np.ndarray:
        rows = df[ITEM].astype(str).map(item_index)
        if rows.isna().any():
            raise ValueError("training items missing from the item index")
        return rows.to_numpy(dtype=np.int64)


class Pop(_Baseline):
    """Training popularity."""

    def fit(self, train_df: pd.DataFrame, item_index: Mapping[str, int]) -> Pop:
        self.n_items = len(item_index)
        pop = np.bincount(self._rows(train_df, item_index), minlength=self.n_items)
        self.pop = torch.tensor(pop, dtype=torch.float32, device=self.device)
        return self

    def _scores(self, state: torch.Tensor) -> torch.Tensor:
        return self.pop.expand(state.shape[0], -1).clone()


class SessionPop(_Baseline):
    """S-POP: count of the item in the session so far, dense popularity rank breaking ties.

    State: ``[count of clicks, ring buffer of the last `history` item rows]`` (float32, exact for
    up to 2**24 items)."""

    def __init__(self, history: int = 200, device: torch.device | str | None = None) -> None:
        super().__init__(device)
        if history < 1:
            raise ValueError("history must be >= 1")
        self.history = history
        self.state_dim = 1 + history

    def fit(self, train_df: pd.DataFrame, item_index: Mapping[str, int]) -> SessionPop:
        self.n_items = len(item_index)
        pop = np.bincount(self._rows(train_df, item_index), minlength=self.n_items)
        self.pop_score = torch.tensor(
            _dense_pop_score(pop), dtype=torch.float32, device=self.device
        )
        return self

    def _advance(self, item_rows: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        new = state.clone()
        n = state[:, 0].long()
        slot = 1 + n % self.history
        new.scatter_(1, slot.unsqueeze(1), item_rows.to(state.dtype).unsqueeze(1))
        new[:, 0] += 1
        return new

    def _scores(self, state: torch.Tensor) -> torch.Tensor:
        b = state.shape[0]
        n = state[:, 0].long().clamp(max=self.history)
        hist = state[:, 1:].long()
        valid = torch.arange(self.history, device=state.device).unsqueeze(0) < n.unsqueeze(1)
        idx = torch.where(valid, hist, self.n_items)  # the extra column swallows empty slots
        counts = torch.zeros(b, self.n_items + 1, device=state.device)
        counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=counts.dtype))
        return counts[:, : self.n_items] + self.pop_score


def item_similarities(
    item_rows: np.ndarray,
    session_codes: np.ndarray,
    n_items: int,
    *,
    n_sims: int = 100,
    lmbd: float = 20.0,
    alpha: float = 0.5,
    max_pairs: int = 20_000_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``n_sims`` regularised co-occurrence similarities per item (see the module docstring).

    Returns ``(neighbours [n_items, n_sims] int64, sims [n_items, n_sims] float64)``, sorted by
    decreasing similarity (ties by row); unused slots point at the item itself with similarity 0.
    """
    supp = np.bincount(item_rows, minlength=n_items).astype(np.float64)
    # (session, item) -> count, grouped by session
    key = session_codes.astype(np.int64) * n_items + item_rows
    uniq, cnt = np.unique(key, return_counts=True)
    s_of, i_of = uniq // n_items, uniq % n_items
    starts = np.flatnonzero(np.r_[True, s_of[1:] != s_of[:-1]])
    m = np.diff(np.r_[starts, len(uniq)])  # distinct items per session
    pair_keys: list[np.ndarray] = []
    pair_vals: list[np.ndarray] = []
    # process sessions in chunks of about max_pairs pairs (a session has m**2 pairs)
    chunk = np.cumsum(m.astype(np.int64) ** 2) // max_pairs
    cuts = np.r_[0, np.flatnonzero(np.diff(chunk)) + 1, len(m)]
    for lo, hi in itertools.pairwise(cuts):
        if hi <= lo:
            continue
        ms, st = m[lo:hi], starts[lo:hi]
        # for every entry e of these sessions, pair it with every entry of its session
        e = np.arange(st[0], st[-1] + ms[-1])
        e_len = np.repeat(ms, ms)
        e_start = np.repeat(st, ms)
        first = np.repeat(e, e_len)
        second = np.repeat(e_start, e_len) + (
            np.arange(len(first)) - np.repeat(np.cumsum(e_len) - e_len, e_len)
        )
        a, b = i_of[first], i_of[second]
        keep = a != b
        pair_keys.append(a[keep] * n_items + b[keep])
        pair_vals.append((cnt[first] * cnt[second])[keep].astype(np.float64))
    co: np.ndarray
    if pair_keys:
        pk, inv = np.unique(np.concatenate(pair_keys), return_inverse=True)
        co = np.bincount(inv, weights=np.concatenate(pair_vals))
    else:
        pk, co = np.zeros(0, np.int64), np.zeros(0)
    ia, ib = pk // n_items, pk % n_items
    sim = co / ((supp[ia] + lmbd) ** alpha * (supp[ib] + lmbd) ** (1.0 - alpha))
    order = np.lexsort((ib, -sim, ia))
    ia, ib, sim = ia[order], ib[order], sim[order]
    row_start = np.searchsorted(ia, np.arange(n_items))
    rank = np.arange(len(ia)) - row_start[ia]
    top = rank < n_sims
    nb = np.repeat(np.arange(n_items, dtype=np.int64)[:, None], n_sims, axis=1)
    val = np.zeros((n_items, n_sims))
    nb[ia[top], rank[top]] = ib[top]
    val[ia[top], rank[top]] = sim[top]
    return nb, val


class ItemKNN(_Baseline):
    """Item-kNN: scores are the similarities of the last item's neighbours (0 elsewhere).

    State: the last item row (-1 before the first click)."""

    def __init__(
        self,
        n_sims: int = 100,
        lmbd: float = 20.0,
        alpha: float = 0.5,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(device)
        self.n_sims, self.lmbd, self.alpha = n_sims, lmbd, alpha

    def fit(self, train_df: pd.DataFrame, item_index: Mapping[str, int]) -> ItemKNN:
        self.n_items = len(item_index)
        sess, _ = pd.factorize(train_df[SESSION].astype(str))
        nb, val = item_similarities(
            self._rows(train_df, item_index),
            sess,
            self.n_items,
            n_sims=min(self.n_sims, max(self.n_items - 1, 1)),
            lmbd=self.lmbd,
            alpha=self.alpha,
        )
        self.neighbours = torch.from_numpy(nb).to(self.device)
        self.sims = torch.from_numpy(val).to(device=self.device, dtype=torch.float32)
        return self

    def initial_state(self, user_state: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size, 1), -1.0, device=self.device)

    def _advance(self, item_rows: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return item_rows.to(state.dtype).unsqueeze(1)

    def _scores(self, state: torch.Tensor) -> torch.Tensor:
        last = state[:, 0].long()
        has = last >= 0
        rows = last.clamp(min=0)
        scores = torch.zeros(state.shape[0], self.n_items, device=state.device)
        vals = self.sims[rows] * has.unsqueeze(1).to(self.sims.dtype)
        return scores.scatter_(1, self.neighbours[rows], vals)


class BPRMF(_Baseline):
    """BPR-MF with sessions as users; a session is the mean of its items' vectors so far.

    Trained on the BPR objective (uniform negatives) with mini-batches and row-wise Adagrad
    (the official code uses per-event SGD, far too slow in Python); seeded.
    State: ``[sum of item vectors, count]``."""

    def __init__(
        self,
        n_factors: int = 100,
        n_epochs: int = 10,
        learning_rate: float = 0.05,
        lambda_session: float = 0.0,
        lambda_item: float = 0.0,
        sigma: float = 0.05,
        batch_size: int = 1024,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(device)
        self.n_factors, self.n_epochs, self.learning_rate = n_factors, n_epochs, learning_rate
        self.lambda_session, self.lambda_item, self.sigma = lambda_session, lambda_item, sigma
        self.batch_size, self.seed = batch_size, seed
        self.state_dim = n_factors + 1

    def fit(self, train_df: pd.DataFrame, item_index: Mapping[str, int]) -> BPRMF:
        self.n_items = len(item_index)
        dev = self.device
        g = torch.Generator().manual_seed(self.seed)
        items = torch.from_numpy(self._rows(train_df, item_index).copy()).to(dev)
        sess_np, uniq = pd.factorize(train_df[SESSION].astype(str))
        sess = torch.from_numpy(sess_np.astype(np.int64)).to(dev)
        k = self.n_factors

        def init(n: int) -> torch.Tensor:
            return ((torch.rand(n, k, generator=g) * 2 - 1) * self.sigma).to(dev)

        su, it, bi = init(len(uniq)), init(self.n_items), torch.zeros(self.n_items, 1, device=dev)
        params = (su, it, bi)
        accum = tuple(torch.zeros_like(w) for w in params)
        lr, n, eps = self.learning_rate, len(items), 1e-10

        def ascend(which: int, rows: torch.Tensor, grad: torch.Tensor) -> None:
            # row-wise Adagrad: sum the gradient of repeated rows first, as sparse Adagrad does
            uniq_rows, inv = torch.unique(rows, return_inverse=True)
            agg = torch.zeros(len(uniq_rows), grad.shape[1], device=dev).index_add_(0, inv, grad)
            acc = accum[which][uniq_rows] + agg * agg
            accum[which][uniq_rows] = acc
            params[which][uniq_rows] += lr * agg / (acc.sqrt() + eps)

        for _ in range(self.n_epochs):
            perm = torch.randperm(n, generator=g).to(dev)
            negs = torch.randint(0, self.n_items, (n,), generator=g).to(dev)
            for b0 in range(0, n, self.batch_size):
                idx = perm[b0 : b0 + self.batch_size]
                s_, p_, q_ = sess[idx], items[idx], negs[b0 : b0 + self.batch_size]
                u, vp, vq = su[s_], it[p_], it[q_]
                x = (u * (vp - vq)).sum(1) + (bi[p_] - bi[q_]).squeeze(1)
                c = torch.sigmoid(-x).unsqueeze(1)  # d log sigmoid(x) / dx
                ascend(0, s_, c * (vp - vq) - self.lambda_session * u)
                ascend(
                    1,
                    torch.cat([p_, q_]),
                    torch.cat([c * u - self.lambda_item * vp, -c * u - self.lambda_item * vq]),
                )
                ascend(2, torch.cat([p_, q_]), torch.cat([c, -c]))
        self.item_vectors = it
        self.item_bias = bi.squeeze(1)
        return self

    def _advance(self, item_rows: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        new = state.clone()
        new[:, :-1] += self.item_vectors[item_rows]
        new[:, -1] += 1
        return new

    def _scores(self, state: torch.Tensor) -> torch.Tensor:
        mean = state[:, :-1] / state[:, -1:].clamp(min=1)
        return mean @ self.item_vectors.T + self.item_bias


BASELINES: dict[str, type[_Baseline]] = {
    "pop": Pop,
    "s-pop": SessionPop,
    "item-knn": ItemKNN,
    "bpr-mf": BPRMF,
}
_ALIASES = {"spop": "s-pop", "itemknn": "item-knn", "knn": "item-knn", "bpr": "bpr-mf"}


def build_baseline(
    name: str,
    train_df: pd.DataFrame,
    item_index: Mapping[str, int] | None = None,
    device: torch.device | str | None = None,
    **params: Any,
) -> _Baseline:
    """Construct and fit a baseline by name (pop, s-pop, item-knn, bpr-mf)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {sorted(BASELINES)}")
    item_index = item_index if item_index is not None else sorted_item_rows(train_df)
    model = BASELINES[key](device=device, **params)
    return model.fit(train_df, item_index)


def run_baseline(
    name: str,
    train_df: pd.DataFrame,
    test_df: pd.DataFrame,
    ks: Iterable[int] = (1, 5, 10, 20),
    ties: str = "conservative",
    *,
    eval_batch_size: int = 512,
    device: torch.device | str | None = None,
    **params: Any,
) -> dict[str, float]:
    """Fit a baseline on ``train_df`` and evaluate it next-item on ``test_df`` (which must only
    contain training items). Returns the metrics of ``evaluate_next_item`` plus ``fit_seconds``
    and ``eval_seconds``."""
    item_index = sorted_item_rows(train_df)
    key = _ALIASES.get(name.lower(), name.lower())
    if key == "s-pop" and "history" not in params:
        _, offsets, _ = session_arrays(test_df, item_index)
        params["history"] = max(int(np.diff(offsets).max(initial=1)), 1)
    t0 = time.perf_counter()
    model = build_baseline(name, train_df, item_index, device=device, **params)
    t1 = time.perf_counter()
    out = evaluate_next_item(
        model,
        test_df,
        item_index,
        ks=ks,
        ties=ties,
        batch_size=eval_batch_size,
        device=model.device,
    )
    out["fit_seconds"] = t1 - t0
    out["eval_seconds"] = time.perf_counter() - t1
    return out
