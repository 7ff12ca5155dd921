"""Champion and challenger: which model answers which key.

* **A/B** (``share`` > 0): a stable hash of the key (the user id, else the session id: the
  Kafka key) puts each key in one arm for its whole life, the challenger's with probability
  ``share``. Each key's states are made by its arm's model (HRNN and GRU states depend on the
  weights), under the usual state keys.
* **Shadow** (``shadow``): the challenger also scores every click, with states of its own
  under the state key prefixed by :data:`SHADOW_NS` (``cu:<user>``, ``ca:<session>``); only
  the champion's answer is published, and both arms are measured on every click.
* With no challenger loaded, every key is the champion's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from streamrec.serving.served_model import ModelHolder, ServingModel
from streamrec.serving.state import ARMS, SHADOW_NS

CHAMPION, CHALLENGER = ARMS
_SCALE = float(2**64)


def key_position(key_id: str) -> float:
    """Where a key (user id, else session id) falls in [0, 1): the first 8 bytes of its
    BLAKE2b digest. The same in every process, on every machine, across restarts."""
    digest = hashlib.blake2b(key_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def arm_of(key_id: str, share: float) -> str:
    """The arm of a key: the challenger's when its position is below ``share``."""
    return CHALLENGER if share > 0 and key_position(key_id) < share else CHAMPION


def is_shadow_key(state_key: str) -> bool:
    """A state key of the shadow arm's own states."""
    return state_key.startswith(SHADOW_NS)


@dataclass(frozen=True)
class ArmModels:
    """The models of one batch: the champion, and the challenger when one is loaded, with how
    it serves (``share`` of the keys, or ``shadow``: every click, unpublished)."""

    champion: ServingModel
    challenger: ServingModel | None = None
    share: float = 0.0
    shadow: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"challenger share must be in [0, 1], got {self.share}")

    @property
    def ab(self) -> bool:
        """Keys are split between the arms."""
        return self.challenger is not None and not self.shadow and self.share > 0

    def arm_of_state_key(self, state_key: str) -> str:
        """The arm whose model keeps ``state_key``'s states (``u:<user>``, ``a:<session>``, or
        a shadow key)."""
        if is_shadow_key(state_key):
            return CHALLENGER
        if not self.ab:
            return CHAMPION
        return arm_of(state_key[2:], self.share)  # the key without its namespace

    def model_of_state_key(self, state_key: str) -> ServingModel:
        """The model that keeps ``state_key``'s states; a key of an arm with no model loaded
        (a shadow key after the challenger is gone) is the champion's."""
        if self.arm_of_state_key(state_key) == CHALLENGER and self.challenger is not None:
            return self.challenger
        return self.champion


#: what the pipeline and the sweep take: one model, or the arms' models
Models = ServingModel | ArmModels


def as_arms(models: Models) -> ArmModels:
    return models if isinstance(models, ArmModels) else ArmModels(models)


@dataclass
class Swap:
    """Models loaded and validated off the serving path, to install between batches."""

    champion: ServingModel | None = None
    challenger: ServingModel | None = None
    #: the registry names no challenger any more (promoted or cleared): stop serving it
    challenger_gone: bool = False

    def __bool__(self) -> bool:
        return self.champion is not None or self.challenger is not None or self.challenger_gone


class Arms:
    """A worker's models: the champion's holder, and the challenger's when the worker serves
    one (``share`` of the keys, or ``shadow``), each following its registry alias."""

    def __init__(
        self,
        champion: ModelHolder,
        challenger: ModelHolder | None = None,
        *,
        share: float = 0.0,
        shadow: bool = False,
    ) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"challenger share must be in [0, 1], got {share}")
        if challenger is None and (share > 0 or shadow):
            raise ValueError("a challenger share or shadow serving needs a challenger holder")
        self.champion = champion
        self.challenger = challenger
        self.share = share
        self.shadow = shadow

    def models(self) -> ArmModels:
        """The models of the next batch (read once per batch: a batch never mixes versions)."""
        challenger = self.challenger.served if self.challenger is not None else None
        return ArmModels(self.champion.current, challenger, self.share, self.shadow)

    def prepare_reload(self) -> Swap:
        """What the registry names now, loaded and validated: safe in a thread of its own
        while batches are served (it only reads the models served)."""
        swap = Swap(self.champion.prepare_reload())
        if self.challenger is not None:
            swap.challenger = self.challenger.prepare_reload()
            swap.challenger_gone = swap.challenger is None and self.challenger.gone()
        return swap

    def install(self, swap: Swap) -> None:
        """Install a prepared swap (between batches)."""
        if swap.champion is not None:
            self.champion.install(swap.champion)
        if self.challenger is not None:
            if swap.challenger is not None:
                self.challenger.install(swap.challenger)
            elif swap.challenger_gone:
                self.challenger.clear()
