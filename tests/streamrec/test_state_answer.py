"""The answer a session state keeps for live metrics: read lazily (ids joined, scores packed),
it scores a click, encodes and refuses bad bytes exactly as the answer decoded whole."""

from __future__ import annotations

import random
import struct
from collections import Counter

import numpy as np
import pytest

from streamrec.serving.live import KS, live_rank
from streamrec.serving.pipeline import evaluate
from streamrec.serving.state import Answer, SessionState, StateDecodeError, encode_answer

SEP = "\x1f"
# ids that are prefixes, suffixes and substrings of each other, the empty id, non-ASCII
PIECES = ["1", "11", "111", "21", "12", "a1", "1a", "", "é", "éé", "x y"]


def _stored(answer: Answer) -> Answer:
    """``answer`` as the next click finds it: through a session state's bytes."""
    state = SessionState("s", np.zeros(3, np.float32), "v", answer=answer)
    back = SessionState.from_bytes(state.to_bytes())
    assert back.answer is not None
    return back.answer


def _answers(rng: random.Random, n: int) -> list[Answer]:
    out = []
    for _ in range(n):
        ids = rng.sample(PIECES, rng.randint(0, len(PIECES)))
        # float32 values (as stored), with ties, best first
        scores = sorted((float(np.float32(rng.randint(0, 6) / 3)) for _ in ids), reverse=True)
        out.append(Answer("v1", rng.choice(["champion", "challenger"]), ids, scores))
    return out


def test_a_stored_answer_finds_the_target_as_list_index_does() -> None:
    """Targets that are substrings of an id, span two ids, hold the separator or are empty
    are found exactly where list.index finds them, and get live_rank's rank."""
    rng = random.Random(7)
    targets = [*PIECES, "", "2", "a", SEP, "1" + SEP + "11", SEP + "1", "11" + SEP, "z"]
    checked = found = 0
    for answer in _answers(rng, 300):
        stored = _stored(answer)
        assert answer.items is not None and answer.scores is not None
        for t in targets:
            want = answer.items.index(t) if t in answer.items else -1
            assert stored.position(t) == want, (answer.items, t)
            assert answer.position(t) == want
            pending = [(0, 1, stored, t)]
            got = evaluate(pending, Counter())[0].rank
            assert got == live_rank(answer.items, answer.scores, t, KS[-1])
            checked += 1
            found += want >= 0
    assert found > 100 and checked - found > 100


def test_a_stored_answer_is_written_back_as_it_was_read() -> None:
    """Not decoded, split, or replaced: each encodes as the answer decoded whole would."""
    rng = random.Random(3)
    for answer in _answers(rng, 100):
        raw = encode_answer(answer)
        stored = _stored(answer)
        assert encode_answer(stored) == raw
        assert stored == answer and stored.n_items == len(answer.items or [])
        assert encode_answer(stored) == raw  # after items and scores were decoded
        replaced = _stored(answer)
        replaced.items = ["new", "ids"]
        replaced.scores = [2.0, 1.0]
        assert encode_answer(replaced) == encode_answer(Answer("v1", answer.arm, *_new()))
    listed = Answer("v", "champion", ["a" + SEP + "b", "c"], [2.0, 1.0])  # length-prefixed
    assert _stored(listed) == listed and _stored(listed).position("a" + SEP + "b") == 0


def _new() -> tuple[list[str], list[float]]:
    return ["new", "ids"], [2.0, 1.0]


def test_packed_scores_encode_as_the_packed_list() -> None:
    scores = np.array([[3.5, 1.25, -0.0, 1e-30]], dtype=np.float32)
    ids = ["a", "b", "c", "d"]
    with_packed = Answer("v", "champion")
    with_packed.fill(ids, scores[0].tolist(), scores.astype("<f4").tobytes())
    plain = Answer("v", "champion", ids, scores[0].tolist())
    assert encode_answer(with_packed) == encode_answer(plain)


def _state_with(section: bytes) -> bytes:
    """An S4 session state whose answer section is ``section``."""
    base = SessionState("s", np.zeros(3, np.float32), "v").to_bytes()
    return base[:-1] + section


@pytest.mark.parametrize(
    "section",
    [
        struct.pack("<BBH", 1, 0, 2) + b"\x01\x00v" + b"\x03\x00a\x1fb" + b"\0" * 7,  # cut short
        struct.pack("<BBH", 1, 0, 3) + b"\x01\x00v" + b"\x03\x00a\x1fb" + b"\0" * 12,  # 2 ids
        struct.pack("<BBH", 1, 0, 1) + b"\x01\x00v" + b"\x01\x00\xff" + b"\0" * 4,  # not UTF-8
        struct.pack("<BBH", 1, 5, 1) + b"\x01\x00v" + b"\x01\x00a" + b"\0" * 4,  # no such arm
        struct.pack("<BBH", 1, 0, 1) + b"\x01\x00\xfe" + b"\x01\x00a" + b"\0" * 4,  # version
        struct.pack("<BBH", 7, 0, 1) + b"\x01\x00v" + b"\x01\x00a" + b"\0" * 4,  # no such kind
        struct.pack("<BBH", 1, 0, 1) + b"\x01\x00v" + b"\x01\x00a" + b"\0" * 5,  # trailing
    ],
)
def test_bad_answer_sections_are_refused(section: bytes) -> None:
    good = struct.pack("<BBH", 1, 0, 1) + b"\x01\x00v" + b"\x01\x00a" + b"\0" * 4
    assert SessionState.from_bytes(_state_with(good)).answer == Answer(
        "v", "champion", ["a"], [0.0]
    )
    with pytest.raises(StateDecodeError):
        SessionState.from_bytes(_state_with(section))
