"""The changelog ticket of one send (streamrec.engines.native.checkpoint.ChangelogTicket):
done only once every record is acknowledged, the last offset of each partition, the refusal."""

from __future__ import annotations

from dataclasses import dataclass

from streamrec.engines.native.checkpoint import ChangelogTicket


@dataclass
class _Delivered:
    """What the producer's delivery callback gets for an acknowledged record."""

    p: int
    o: int

    def partition(self) -> int:
        return self.p

    def offset(self) -> int:
        return self.o


def test_a_ticket_is_done_once_each_of_its_records_is_acknowledged() -> None:
    ticket = ChangelogTicket()
    assert ticket.done and ticket.failed is None  # a send of nothing
    ticket.pending = 3
    ticket.delivered(None, _Delivered(0, 5))
    assert not ticket.done
    ticket.delivered(None, _Delivered(1, 9))
    assert not ticket.done
    ticket.delivered(None, _Delivered(0, 4))  # acknowledged out of order: the last stays
    assert ticket.done and ticket.failed is None and ticket.offsets == {0: 5, 1: 9}


def test_a_refused_record_fails_the_ticket_and_still_counts() -> None:
    ticket = ChangelogTicket()
    ticket.pending = 2
    ticket.delivered("broker down", None)
    assert ticket.failed == "broker down" and not ticket.done
    ticket.delivered(None, _Delivered(0, 1))
    assert ticket.done and ticket.failed == "broker down"
