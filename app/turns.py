"""Model calls in turn, so that one browser session cannot starve another.

Every search and every answer of every session runs its model call under one :class:`FairLock`, which
serves callers in the order they came (``threading.Lock`` promises no order). A caller waiting for its turn
checks, while it waits, whether its session has sent a newer request; if so it gives up its place and the
page reruns with the newer one. With ``clipdex app``'s ``runner.fastReruns`` off, a session runs one script
at a time, so a burst of queries from one session holds at most one call and one place in the queue, and
any other session's request waits for at most those two.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

POLL_S = 0.05  # how often a waiting caller checks whether it was superseded


class FairLock:
    """A lock granted first come, first served; a waiter may give up its place (see :meth:`turn`)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._held = False

    @contextmanager
    def turn(self, *, superseded: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the lock for the ``with`` block, after every caller that asked before. ``superseded`` is
        called every :data:`POLL_S` while waiting: an exception it raises gives up the place (and leaves
        the lock to the next caller) and propagates."""
        me = object()
        with self._cond:
            self._queue.append(me)
            try:
                while self._held or self._queue[0] is not me:
                    self._cond.wait(POLL_S)
                    if superseded is not None:
                        superseded()
            except BaseException:
                self._queue.remove(me)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()

    def waiting(self) -> int:
        """Callers waiting for their turn now."""
        with self._cond:
            return len(self._queue)


def streamlit_superseded() -> Callable[[], None] | None:
    """The running page's check for a newer request from its session (it raises Streamlit's rerun or stop
    exception, as any ``st.*`` call would at that point); None outside a page run."""
    from streamlit.runtime.scriptrunner_utils.script_run_context import get_run_yield_check

    return get_run_yield_check()
