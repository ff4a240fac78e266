"""Kafka's murmur2 hash (the default partitioner's), four bytes at a time.

kafka-python's ``murmur2`` assembles each word from single bytes and masks after every
operation: 13-14 us for a 30-byte key, about a tenth of the publishing thread's time per record
in a drain; this one takes about 7. The same arithmetic on words unpacked in one call returns
the same values (tests/unit/test_murmur2.py: against kafka-python's and Kafka's own vectors).
"""

from __future__ import annotations

import struct

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
# One compiled format per word count seen (keys are mostly of a few lengths).
_WORDS: dict[int, struct.Struct] = {}


def murmur2(data: bytes) -> int:
    """The unsigned 32-bit MurmurHash2 of ``data``, as Kafka's Java client computes it."""
    m, mask = _M, _MASK  # locals: a global's lookup costs more in the loop
    length = len(data)
    h = _SEED ^ length
    words = length >> 2
    if words:
        unpack = _WORDS.get(words)
        if unpack is None:
            unpack = _WORDS[words] = struct.Struct(f"<{words}I")
        for k in unpack.unpack_from(data):
            k = (k * m) & mask
            h = ((h * m) & mask) ^ (((k ^ (k >> 24)) * m) & mask)
    tail = length & 3
    if tail:
        end = length & ~3
        if tail == 3:
            h ^= data[end + 2] << 16
        if tail >= 2:
            h ^= data[end + 1] << 8
        h = ((h ^ data[end]) * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    return h ^ (h >> 15)
