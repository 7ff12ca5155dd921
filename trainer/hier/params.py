"""Training parameters of HRNN and p-RNN (``--param key=value``, presets), on top of the
shared :class:`~trainer.presets.BaseParams`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from trainer.presets import PRESETS as GRU4REC_PRESETS
from trainer.presets import BaseParams

#: the training schedules over a model's parameter groups (``trainer.hier.schedules``)
SCHEDULES = ("joint", "residual", "alternating", "interleaving")


@dataclass
class HierParams(BaseParams):
    """Training parameters of the user-parallel loop (HRNN, p-RNN): the shared
    :class:`~trainer.presets.BaseParams` (same names and defaults as GRU4Rec's) plus the loop's
    own options. The models' options are in the subclasses :class:`HRNNParams` and
    :class:`PRNNParams`."""

    schedule: str = "joint"
    shuffle_users: bool = False
    # "user": user-parallel mini-batches; "session": time-ordered session-parallel ones with a
    # per-user state table (see ``trainer.hier``)
    batching: str = "user"
    # session batching only: a user's next session waits until their previous one has ended
    # (False: GRU4Rec's schedule exactly, sessions of one user may overlap in training)
    wait_for_user: bool = True
    # GRU4Rec's session memory on the session part (streamrec.model.session_memory), fitted on
    # held-out sessions (trainer.hier.memory), as GRU4Rec's defaults; 0: the papers' models.
    # On by default: MRR@20 +10% (HRNN), +8% (p-RNN) on the ML-1M 1k-user validation split,
    # one seed (bench/results/accuracy-beyond-gru4rec.md)
    session_memory: int = 64  # the session's last K distinct items get a fitted score offset
    memory_gate: bool = True  # the offsets are also a linear function of the hidden state
    memory_holdout: float = 0.1  # share of sessions held out of all but the last epoch (the fit)

    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **BaseParams.CHOICES,
        "schedule": SCHEDULES,
        "batching": ("session", "user"),
    }
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = GRU4REC_PRESETS
    MIN_EPOCHS: ClassVar[int] = 0

    def __post_init__(self) -> None:
        self.validate()


@dataclass
class HRNNParams(HierParams):
    """HRNN: training parameters plus the model's options (``--param key=value``).

    Defaults: GRU4Rec's for everything the two share (so that ``--model hrnn`` and ``--model
    gru4rec`` at their defaults differ only by the user path), a user GRU as wide as the session
    GRU, and dropout 0.5 on the user state and on the session initialisation made from it: the
    user path otherwise memorises each user's training items over the epochs (lower training
    loss, worse held-out last sessions). ``user_to_output`` (on in the authors' training
    script) is off: it memorised even more. Chosen on sessionised MovieLens-1M and a synthetic
    log with planted user tastes; see bench/results/hrnn-losses-defaults.md. Batches are GRU4Rec's
    time-ordered session-parallel ones with GRU4Rec's own schedule (``batching="session"``,
    ``wait_for_user=False``), and the schedule is staged (``schedule="residual"``): the session
    network trains first exactly as GRU4Rec, then the user path on top of it. The user path
    includes an item memory of the user's last 200 distinct items of earlier sessions
    (``memory``; 800 bytes in each user and session state) with a learnt score offset, which
    a 100-number user state cannot replace (bench/results/hrnn-staged-memory.md), and GRU4Rec's
    session memory on the session part (``session_memory=64``, its gate and held-out fit, as
    GRU4Rec's defaults; MRR@20 +10%, Recall@20 +7% on the ML-1M 1k-user validation split, one
    seed: bench/results/accuracy-beyond-gru4rec.md). The preset ``hrnn_paper_small`` (and
    every ``*_paper`` preset) is the paper's model: no memory of either kind; the first also
    the paper's training: joint schedule, user-parallel batches.
    """

    batching: str = "session"
    wait_for_user: bool = False
    schedule: str = "residual"
    layers: list[int] = field(default_factory=lambda: [100])
    user_layers: list[int] = field(default_factory=lambda: [100])
    embedding: int = 0
    constrained_embedding: bool = True
    user_to_output: bool = False
    dropout_p_embed: float = 0.0
    dropout_p_hidden: float = 0.0
    dropout_p_user: float = 0.5
    dropout_p_init: float = 0.5
    # the user's last `memory` distinct items of earlier sessions and a learnt score offset
    # for them (streamrec.model.hrnn); 0: the paper's HRNN
    memory: int = 200

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        **GRU4REC_PRESETS,
        # Quadrana et al. 2017, small networks: 100 units per layer, TOP1, Adagrad lr 0.1,
        # batch 50, session dropout 0.1, 10 epochs, no extra samples; the authors' code
        # (mquad/hgru4rec) applies tanh to the scores for TOP1 when no final activation is given
        "hrnn_paper_small": dict(
            loss="top1", final_act="tanh", layers=[100], user_layers=[100], embedding=0,
            constrained_embedding=False, batch_size=50, learning_rate=0.1, momentum=0.0,
            n_epochs=10, n_sample=0, dropout_p_hidden=0.1, dropout_p_user=0.0,
            dropout_p_init=0.0, dropout_p_embed=0.0, user_to_output=False,
            memory=0, session_memory=0, schedule="joint", batching="user",
        ),
    }  # fmt: skip

    def model_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`streamrec.model.hrnn.HRNN` (besides n_items, variant)."""
        return {
            "layers": self.layers,
            "user_layers": self.user_layers,
            "embedding": self.embedding,
            "constrained_embedding": self.constrained_embedding,
            "user_to_output": self.user_to_output,
            "final_act": self.resolved_final_act(),
            "elu_param": self.resolved_elu_param(),
            "dropout_p_embed": self.dropout_p_embed,
            "dropout_p_hidden": self.dropout_p_hidden,
            "dropout_p_user": self.dropout_p_user,
            "dropout_p_init": self.dropout_p_init,
            "memory": self.memory,
            "session_memory": self.session_memory,
            "memory_gate": self.memory_gate,
        }


@dataclass
class PRNNParams(HierParams):
    """p-RNN: training parameters plus the model and item-feature options."""

    arch: str = "parallel"
    id_hidden: int = 100
    feature_hidden: list[int] = field(default_factory=lambda: [100])
    embedding: int = 0
    subnet_weights: list[float] = field(default_factory=list)
    dropout_p_embed: float = 0.0
    dropout_p_hidden: float = 0.0
    category_columns: list[str] = field(default_factory=lambda: ["Genres"])
    text_columns: list[str] = field(default_factory=lambda: ["Title"])
    tfidf_dim: int = 256
    missing_flag: bool = True

    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **HierParams.CHOICES,
        "arch": ("parallel", "id", "feature", "concat"),
    }


_P = TypeVar("_P", bound=HierParams)


def parse_hier_params(pairs: Iterable[str], cls: type[_P], preset: str | None = None) -> _P:
    """``key=value`` strings (and an optional preset) -> ``cls`` parameters.

    Unknown keys and invalid values raise :class:`~trainer.presets.ParamError` (a ValueError)
    naming them."""
    return cls.make(preset, list(pairs))
