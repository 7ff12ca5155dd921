"""The user chain of session-parallel HRNN training: each session's user state is made from
the user's previous session (see :class:`UserChain`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from streamrec.model.api import TrainableModule
from trainer.hier.batches import SessionParallelBatches, user_states


@dataclass
class UserChain:
    """How each session's user state is made in session-parallel training: from the pair of
    the user's previous session, ``end_session(user_in, final)`` (the user state that session
    started from and its final state), stored when that session ends and applied, with
    gradient, when the next one starts (the user GRU learns from the next session's first
    prediction, as in the authors' code).

    A session that starts after its predecessor has ended (every one with ``wait_for_user``)
    finds the pair in a per-user table: sessions start in time order, so a user has at most one
    such pair waiting. A session that starts while its predecessor still runs in another slot
    (only without ``wait_for_user``; fixed by the schedule, so the same ones every epoch) uses
    the pair stored for it in the previous epoch, complete in content and one epoch old in
    weights; in the first epoch, the state its user's latest session started from."""

    user_pair_in: Tensor  # [n_users, user_dim]: the pair waiting for the user's next session
    user_pair_final: Tensor  # [n_users, state_dim]
    last_start: Tensor  # [n_users, user_dim]: the user state of the user's latest session start
    ov_in: Tensor  # [n_overlapping, user_dim]: the pairs of the overlapping sessions
    ov_final: Tensor  # [n_overlapping, state_dim]
    ov_ready: np.ndarray  # [n_overlapping] (host): stored (from the second epoch on)
    ov_id: np.ndarray  # [n_sessions]: index into ov_* of an overlapping session, else -1
    next_ov: np.ndarray  # [n_sessions]: ov_id of the user's next session (-1: none or waits)
    next_waits: np.ndarray  # [n_sessions]: the user's next session starts after this one ends
    user: np.ndarray  # [n_sessions]: the session's user (SessionParallelBatches.user)
    has_prev: np.ndarray  # [n_sessions]: the user had an earlier session

    @classmethod
    def make(
        cls, model: TrainableModule, b: SessionParallelBatches, dev: torch.device
    ) -> UserChain:
        n = len(b.prev)
        nxt = np.full(n, -1, dtype=np.int64)
        has = b.prev >= 0
        nxt[b.prev[has]] = np.flatnonzero(has)
        start, end = np.zeros(n, np.int64), np.zeros(n, np.int64)
        t, s = np.nonzero(b.start)
        start[b.session[t, s]] = t
        t, s = np.nonzero(b.end)
        end[b.session[t, s]] = t
        overlap = has & (start <= end[np.where(has, b.prev, 0)])
        ov_id = np.where(overlap, np.cumsum(overlap) - 1, -1)
        n_ov = int(overlap.sum())
        nxt_ov = np.where(nxt >= 0, ov_id[np.maximum(nxt, 0)], -1)
        return cls(
            user_pair_in=user_states(model.initial_user_state(b.n_users)),
            user_pair_final=torch.zeros(b.n_users, int(model.state_dim), device=dev),
            last_start=user_states(model.initial_user_state(b.n_users)),
            ov_in=user_states(model.initial_user_state(n_ov)),
            ov_final=torch.zeros(n_ov, int(model.state_dim), device=dev),
            ov_ready=np.zeros(n_ov, dtype=bool),
            ov_id=ov_id,
            next_ov=nxt_ov,
            next_waits=(nxt >= 0) & (nxt_ov < 0),
            user=b.user,
            has_prev=has,
        )

    def store(self, sess: np.ndarray, user_in: Tensor, final: Tensor) -> None:
        """Sessions ``sess`` ended with these starting user states and final states."""
        dev = final.device
        k_all = self.next_ov[sess]
        ov = np.flatnonzero(k_all >= 0)
        if ov.size:
            k = k_all[ov]
            sel = torch.from_numpy(ov).to(dev)
            self.ov_in.index_copy_(0, torch.from_numpy(k).to(dev), user_in.index_select(0, sel))
            self.ov_final.index_copy_(0, torch.from_numpy(k).to(dev), final.index_select(0, sel))
            self.ov_ready[k] = True
        wait = np.flatnonzero(self.next_waits[sess])
        if wait.size:  # at most one per user (see the class docstring)
            u = torch.from_numpy(self.user[sess[wait]]).to(dev)
            sel = torch.from_numpy(wait).to(dev)
            self.user_pair_in.index_copy_(0, u, user_in.index_select(0, sel))
            self.user_pair_final.index_copy_(0, u, final.index_select(0, sel))

    def start(self, model: TrainableModule, sess: np.ndarray) -> Tensor:
        """The user states sessions ``sess`` start from (with gradient through the user GRU)."""
        dev = self.user_pair_final.device
        users, has_prev = self.user[sess], self.has_prev[sess]
        k = self.ov_id[sess]
        ov = np.flatnonzero(k >= 0)
        u = torch.from_numpy(users).to(dev)
        pair_in = self.user_pair_in.index_select(0, u)
        pair_final = self.user_pair_final.index_select(0, u)
        if ov.size:
            sel, kk = torch.from_numpy(ov).to(dev), torch.from_numpy(k[ov]).to(dev)
            pair_in = pair_in.index_copy(0, sel, self.ov_in.index_select(0, kk))
            pair_final = pair_final.index_copy(0, sel, self.ov_final.index_select(0, kk))
        # end_session for every starting slot (so that the dropout draws are those of the
        # user-parallel loop), kept where the session has a stored pair
        advanced = user_states(model.end_session(pair_in, pair_final))
        ov_ready = np.zeros(len(sess), dtype=bool)
        ov_ready[ov] = self.ov_ready[k[ov]]
        ready = has_prev & ((k < 0) | ov_ready)
        us = torch.where(
            torch.from_numpy(ready).to(dev).unsqueeze(1),
            advanced,
            user_states(model.initial_user_state(len(sess))),
        )
        stale = np.flatnonzero(has_prev & ~ready)
        if stale.size:  # first epoch, the predecessor still running
            sel = torch.from_numpy(stale).to(dev)
            last = self.last_start.index_select(0, torch.from_numpy(users[stale]).to(dev))
            us = us.index_copy(0, sel, last)
        # the latest session of each user (two may start at once without wait_for_user)
        order = np.argsort(sess, kind="stable")[::-1]
        uniq, first = np.unique(users[order], return_index=True)
        latest = torch.from_numpy(order[first].copy()).to(dev)
        self.last_start.index_copy_(
            0, torch.from_numpy(uniq).to(dev), us.detach().index_select(0, latest)
        )
        return us
