"""What a worker knows of the topic it consumes (:class:`InputTopic`), and the one rule that
says whether a state's recorded position makes a record a redelivery (:meth:`InputTopic.applied`).

* **Incarnation.** A topic deleted and created again (or the embedded broker restarted: its
  storage is memory) starts its offsets at 0 again, so a position (partition, offset) alone
  would mark every click of a returning user as already applied. The incarnation is the
  topic's id as the broker reports it (Kafka's topic ids, KIP-516, Kafka 2.8 and later; the
  embedded broker gives a new one to every topic it creates), recorded in every state beside
  its position. A position of another incarnation is never a duplicate source. Unknown
  (``""``: a state written before positions named incarnations, or a broker that reports no
  topic id) compares as before, by partition and offset alone.
* **How far each partition reaches** (``ends``): an offset no applied event can have reached,
  the partition's end when the worker took it (its true end on the embedded broker, which
  reports less), raised by every record read since. A state whose position is at or beyond
  it was not written by a worker of this topic (a forged or foreign changelog record): it is
  not a duplicate source either, so it cannot freeze its key. A partition without a known end
  is not checked.
* **Partitioner and partition count**: the partition each key must arrive on
  (``streamrec.kafka.partitioners``); a record elsewhere is dead-lettered ``wrong_partition``
  (:mod:`streamrec.serving.admission`). A count of 0 turns the check off (the core's tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from streamrec.kafka.partitioners import partition_function


@dataclass
class InputTopic:
    """The clicks topic as the worker knows it: incarnation, partitions, partitioner, ends."""

    partitions: int = 0
    partitioner: str = "consistent_random"
    incarnation: str = ""
    #: partition -> an offset no event applied to a state can have reached (see above)
    ends: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._partition_of = partition_function(self.partitioner)

    def partition_of(self, key: bytes) -> int | None:
        """The partition the producers' partitioner gives ``key``; None if not checked."""
        if self.partitions <= 0:
            return None
        return self._partition_of(key, self.partitions)

    def note(self, partition: int, offset: int) -> None:
        """A record at ``offset`` was read: the partition reaches at least past it."""
        end = self.ends.get(partition)
        if end is not None and offset >= end:
            self.ends[partition] = offset + 1

    def applied(
        self, incarnation: str, partition: int, offset: int, rec_partition: int, rec_offset: int
    ) -> bool:
        """Whether a state at position (``incarnation``, ``partition``, ``offset``) has
        already applied the record at (``rec_partition``, ``rec_offset``) of this topic."""
        if rec_offset < 0 or partition != rec_partition or rec_offset > offset:
            return False
        if incarnation and self.incarnation and incarnation != self.incarnation:
            return False  # a position in an earlier life of the topic
        end = self.ends.get(partition)
        return end is None or offset < end


#: what the core uses when no engine says more (the core's tests): no incarnation, no ends,
#: no partition check; positions compare by partition and offset
UNKNOWN_TOPIC = InputTopic()
