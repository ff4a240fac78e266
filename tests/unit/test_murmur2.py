"""The relay's murmur2 is kafka-python's (Kafka's default partitioner's), value for value."""

from __future__ import annotations

import random

from kafka.partitioner.default import murmur2 as kafka_murmur2

from relay.dispatch.murmur2 import murmur2


def test_the_hash_of_every_length_and_byte_is_kafka_pythons() -> None:
    rnd = random.Random(20261205)
    keys = [bytes(rnd.randrange(256) for _ in range(n)) for n in range(300) for _ in range(8)]
    keys += [
        b"",
        b"\x00",
        b"\xff" * 7,
        b"21",
        "order-\u6f22".encode(),
        b"d-1234567-abcdefghijklmnopqrst",
    ]
    assert [murmur2(k) for k in keys] == [kafka_murmur2(k) for k in keys]


def test_known_values_of_the_java_client() -> None:
    # Apache Kafka's UtilsTest.testMurmur2 (signed ints there; unsigned here).
    cases = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    assert {k: murmur2(k) for k in cases} == {k: v % 2**32 for k, v in cases.items()}
