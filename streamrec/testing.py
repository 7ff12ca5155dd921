"""Test support shipped inside the package: a broker for tests, unique names, a small
step-API model and click builders. streamrec's own tests use it; so can code built on it.

``TinyStepModel`` is a small GRU session model (optionally with an HRNN-style user level)
that implements the step API of docs/architecture.md; it stands in for trained models where
a test only needs the contract.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from streamrec.kafka.clients import TopicSpec, ensure_topics
from streamrec.kafka.embedded import EmbeddedBroker
from streamrec.serving.served_model import ServingModel

TEST_BOOTSTRAP_ENV = "STREAMREC_TEST_BOOTSTRAP"

_counter = itertools.count()


def unique_name(prefix: str = "t") -> str:
    """A topic/group name no other test (or earlier run against the same broker) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}-{next(_counter)}"


@contextmanager
def test_broker() -> Iterator[str]:
    """Bootstrap address of the broker named by STREAMREC_TEST_BOOTSTRAP, else an embedded one."""
    external = os.environ.get(TEST_BOOTSTRAP_ENV)
    if external:
        yield external
        return
    with EmbeddedBroker(port=0) as broker:
        yield broker.bootstrap


class TinyStepModel(nn.Module):
    """GRU4Rec-shaped stand-in: embedding -> GRUCell -> dot product with item embeddings.

    With ``user_dim > 0`` it behaves like HRNN's "init" variant: ``end_session`` advances a
    user GRU with the final session state and ``initial_state`` is ``tanh(W c + b)``.
    """

    def __init__(self, n_items: int, dim: int = 16, user_dim: int = 0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.n_items = n_items
        self.state_dim = dim
        self.user_state_dim = user_dim
        self.emb = nn.Parameter(torch.randn(n_items, dim, generator=g) * 0.5)
        self.cell = nn.GRUCell(dim, dim)
        for p in self.cell.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3
        if user_dim:
            self.user_cell = nn.GRUCell(dim, user_dim)
            self.init = nn.Linear(user_dim, dim)
            for p in [*self.user_cell.parameters(), *self.init.parameters()]:
                p.data = torch.randn(p.shape, generator=g) * 0.3

    def initial_user_state(self, batch_size: int) -> torch.Tensor | None:
        if not self.user_state_dim:
            return None
        return torch.zeros(batch_size, self.user_state_dim, device=self.emb.device)

    def initial_state(self, user_state: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        if self.user_state_dim and user_state is not None:
            return torch.tanh(self.init(user_state))
        return torch.zeros(batch_size, self.state_dim, device=self.emb.device)

    def step(
        self, item_rows: torch.Tensor, state: torch.Tensor, user_state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        known = item_rows >= 0
        x = self.emb[item_rows.clamp(min=0)]
        new = self.cell(x, state)
        new = torch.where(known[:, None], new, state)
        return new, new @ self.emb.T

    def end_session(
        self, user_state: torch.Tensor | None, final_state: torch.Tensor
    ) -> torch.Tensor | None:
        if not self.user_state_dim or user_state is None:
            return user_state
        return self.user_cell(final_state, user_state)


def tiny_serving_model(
    n_items: int = 50,
    dim: int = 16,
    user_dim: int = 0,
    version: str = "v1",
    seed: int = 0,
    top_k: int = 5,
    device: str = "cpu",
) -> ServingModel:
    """A ServingModel around TinyStepModel with item ids ``i0 .. i{n-1}``."""
    model = TinyStepModel(n_items, dim, user_dim, seed)
    return ServingModel(
        model, [f"i{j}" for j in range(n_items)], version, device=device, top_k=top_k
    )


@dataclass(frozen=True)
class WorkerTopics:
    """A test's own clicks, recommendations and dead-letter topics and worker app id."""

    bootstrap: str
    clicks: str
    recs: str
    dead: str
    app_id: str
    partitions: int

    @property
    def conf(self) -> dict[str, Any]:
        """confluent-kafka client config for the broker."""
        return {"bootstrap.servers": self.bootstrap}

    def settings(self) -> dict[str, object]:
        """Worker settings (dotted keys, as ``streamrec.tools.launch.settings_env`` takes them) for
        these topics and app id; metrics on a port the system picks."""
        return {
            "kafka.bootstrap_servers": self.bootstrap,
            "topics.clicks": self.clicks,
            "topics.recommendations": self.recs,
            "topics.dead_letter": self.dead,
            "topics.partitions": self.partitions,
            "worker.app_id": self.app_id,
            "worker.metrics_port": 0,
        }


def worker_topics(bootstrap: str, name: Callable[[str], str], partitions: int) -> WorkerTopics:
    """New topic and app names from ``name`` (:func:`unique_name`, or the fixture of that
    name); the three topics are created with ``partitions`` partitions each."""
    t = WorkerTopics(bootstrap, name("clicks"), name("recs"), name("dead"), name("app"), partitions)
    ensure_topics(t.conf, [TopicSpec(x, partitions) for x in (t.clicks, t.recs, t.dead)])
    return t


def click(
    session: str,
    item: str | None,
    *,
    user: str | None = None,
    t: float | None = None,
    event_id: str | None = None,
    type: str = "click",
) -> bytes:
    """JSON value of one click as a producer would publish it."""
    d: dict[str, Any] = {"session_id": session, "type": type}
    if item is not None:
        d["item_id"] = item
    if user is not None:
        d["user_id"] = user
    d["timestamp"] = time.time() if t is None else t
    if event_id is not None:
        d["event_id"] = event_id
    return json.dumps(d).encode()


def offline_recommendations(
    model: ServingModel, sessions: Iterable[Sequence[str]], k: int | None = None
) -> list[tuple[list[str], list[float]]]:
    """Top-k after each prefix of each session, one session at a time (the reference)."""
    out = []
    for items in sessions:
        users = model.initial_user_states(1)
        state = model.initial_states(users, 1)
        for it in items:
            o = model.step(model.rows([it]), state, users if model.user_state_dim else None, k)
            state = o.states
            out.append((model.ids(o.top_rows[0]).tolist(), o.top_scores[0].tolist()))
    return out
