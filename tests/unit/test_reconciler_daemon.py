"""relay/reconciler/daemon.py: what the daemon reports about itself."""

from __future__ import annotations

import threading

import pytest

from relay.config import load_settings
from relay.reconciler.daemon import Reconciler


def test_a_dead_timers_thread_is_reported_until_the_reconciler_stops() -> None:
    daemon = Reconciler(load_settings(None))
    try:
        daemon.timers_alive()  # not started yet: nothing to report
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()
        daemon._timers_thread = thread
        with pytest.raises(RuntimeError, match="timers thread died"):
            daemon.timers_alive()
        daemon.stop()
        daemon.timers_alive()  # stopping: it is meant to end
    finally:
        daemon.observations.close()
