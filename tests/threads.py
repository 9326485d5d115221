"""Run a function in a thread of its own and hand back what it returned, or raise what it raised."""
from __future__ import annotations

import threading
from collections.abc import Callable


def in_thread(fn: Callable, *, timeout: float, cleanup: Callable[[], None] = lambda: None):
    """fn() in a new thread, joined for `timeout` seconds; `cleanup` runs in that thread when fn is done
    (closing the thread's database connections, flushing what it published)."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc
        finally:
            cleanup()

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
