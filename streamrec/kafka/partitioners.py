"""The partition a producer's partitioner gives a key, for the partitioners of librdkafka.

Producers of the clicks topic key each click by its user (else its session), and the
workers keep a key's state in the partition its records arrive on. A producer that uses
another partitioner than the others puts one key's clicks on two partitions and forks its
state, so the workers check every record's partition against the partitioner named in
``topics.partitioner`` (``streamrec.serving.input_topic``).

Names are librdkafka's ``partitioner`` values: ``consistent_random`` (librdkafka's default,
so confluent-kafka's and ``streamrec produce``'s: CRC-32 of the key), ``murmur2_random``
(the Java client's default: murmur2 of the key, made positive), ``fnv1a_random`` (FNV-1a).
The ``_random`` variants differ from ``consistent``/``murmur2``/``fnv1a`` only for records
without a key, which the workers refuse anyway. ``tests/streamrec/test_partitioners.py``
checks each against librdkafka itself on the embedded broker.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import lru_cache
from typing import get_args

from streamrec.settings import Partitioner

PARTITIONERS: tuple[Partitioner, ...] = get_args(Partitioner)

_M32 = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """The Java client's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``) as an
    unsigned 32-bit value; librdkafka's ``rd_murmur2`` is the same function."""
    m, length = 0x5BD1E995, len(data)
    h = (0x9747B28C ^ length) & _M32
    end = length - length % 4
    for i in range(0, end, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & _M32
        k ^= k >> 24
        k = (k * m) & _M32
        h = ((h * m) & _M32) ^ k
    rest = length % 4
    if rest:
        if rest == 3:
            h ^= data[end + 2] << 16
        if rest >= 2:
            h ^= data[end + 1] << 8
        h ^= data[end]
        h = (h * m) & _M32
    h ^= h >> 13
    h = (h * m) & _M32
    h ^= h >> 15
    return h


def fnv1a(data: bytes) -> int:
    """32-bit FNV-1a (librdkafka's ``rd_fnv1a``)."""
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & _M32
    return h


def _crc32_partition(key: bytes, n: int) -> int:
    return zlib.crc32(key) % n


def _murmur2_partition(key: bytes, n: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % n


def _fnv1a_partition(key: bytes, n: int) -> int:
    h = fnv1a(key)  # librdkafka takes it as a signed 32-bit int: abs(h % n) in C
    return abs(h - (1 << 32) if h & 0x80000000 else h) % n


_BY_NAME: dict[str, Callable[[bytes, int], int]] = {
    "consistent_random": _crc32_partition,
    "consistent": _crc32_partition,
    # pure Python, ~2 µs a key: cached (a key's clicks come again and again)
    "murmur2_random": lru_cache(maxsize=1 << 16)(_murmur2_partition),
    "murmur2": lru_cache(maxsize=1 << 16)(_murmur2_partition),
    "fnv1a_random": lru_cache(maxsize=1 << 16)(_fnv1a_partition),
    "fnv1a": lru_cache(maxsize=1 << 16)(_fnv1a_partition),
}


def partition_function(name: str) -> Callable[[bytes, int], int]:
    """(key, partition count) -> the partition ``name`` gives the key."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(
            f"unknown partitioner {name!r}; one of {', '.join(PARTITIONERS)}"
        ) from None
