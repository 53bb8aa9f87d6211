"""Event loops that let pending reads finish before they close, for orbax's reads (`settling_loops`).

orbax runs each read in a fresh asyncio event loop and closes it as soon as one array's read fails; the
other reads' tasks are left pending and, when tensorstore completes them later, raise "Event loop is
closed" from its threads. Inside `settling_loops` the loops asyncio creates wait for those tasks first,
so every read ends inside the failing call. The policy is process-wide while the block runs (asyncio has
no other hook), and restored after it.

>>> import asyncio
>>> with settling_loops():
...     loop = asyncio.new_event_loop()
>>> type(loop).__name__
'SettlingLoop'
>>> loop.close()
"""

import asyncio
import contextlib
import warnings

__all__ = ["SettlingLoop", "settling_loops", "SETTLE_S"]

SETTLE_S = 120.0  # at most this long for the reads left pending by a failed read


class SettlingLoop(asyncio.SelectorEventLoop):
    """An event loop that, when closed with tasks still pending, first lets them finish (at most `SETTLE_S`)."""

    def close(self) -> None:
        pending = [t for t in asyncio.all_tasks(self) if not t.done()]
        if pending and not self.is_running() and not self.is_closed():
            done, late = self.run_until_complete(asyncio.wait(pending, timeout=SETTLE_S))
            for task in late:
                task.cancel()
            if late:
                self.run_until_complete(asyncio.wait(late))
            for task in done | late:  # retrieved, so asyncio does not log them as never retrieved
                if not task.cancelled():
                    task.exception()
        super().close()


def _settling_policy():
    class _SettlingPolicy(asyncio.DefaultEventLoopPolicy):
        def new_event_loop(self):
            return SettlingLoop()

    return _SettlingPolicy()


def _set_policy(policy):
    """Installs ``policy``, returning the previous one (event-loop policies warn from Python 3.14 on)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        previous = asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(policy)
    return previous


@contextlib.contextmanager
def settling_loops():
    """The event loops created inside the block are `SettlingLoop` instances."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        policy = _settling_policy()
    previous = _set_policy(policy)
    try:
        yield
    finally:
        _set_policy(previous)
