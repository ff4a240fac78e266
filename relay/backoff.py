"""Exponential backoff with jitter, for waiting out PostgreSQL and Kafka outages."""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, initial_s: float = 0.5, max_s: float = 30.0) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.failures = 0

    def next_delay(self) -> float:
        """The next wait: doubles per failure up to the cap, with +-20% jitter against herds."""
        base = min(self.max_s, self.initial_s * (2 ** min(self.failures, 30)))
        self.failures += 1
        return float(base * random.uniform(0.8, 1.2))

    def reset(self) -> None:
        self.failures = 0
