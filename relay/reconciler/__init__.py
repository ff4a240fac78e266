"""The reconciler: closes the loop between "published" and "really happened downstream".

``relay reconcile`` consumes the downstream results of the declared effect types, turns a missed
deadline into UNKNOWN, asks observers about UNKNOWN effects, creates compensations, and leaves
what it cannot decide STUCK for a person (``relay resolve``). Applications follow their effects
with :class:`~relay.status_feed.StatusFeed`.
"""

from __future__ import annotations

from relay.reconciler.observers import Observation, ObservedEffect
from relay.status_feed import StatusFeed

__all__ = ["Observation", "ObservedEffect", "StatusFeed"]
