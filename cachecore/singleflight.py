"""Concurrent callers asking for the same key share one call."""
from __future__ import annotations

from typing import Awaitable, Callable, Hashable

import trio


class _Flight:
    __slots__ = ("done", "result", "error")

    def __init__(self):
        self.done = trio.Event()
        self.result = None
        self.error: BaseException | None = None


class SingleFlight:
    def __init__(self):
        self._flights: dict[Hashable, _Flight] = {}

    def __len__(self):
        return len(self._flights)

    async def run(self, key: Hashable, fn: Callable[[], Awaitable]):
        flight = self._flights.get(key)
        if flight is not None:
            await flight.done.wait()
            if flight.error is not None:
                # A fresh exception per waiter: re-raising one object from many
                # tasks would splice their tracebacks together.
                raise type(flight.error)(*flight.error.args)
            return flight.result
        flight = self._flights[key] = _Flight()
        try:
            flight.result = await fn()
            return flight.result
        except Exception as e:
            flight.error = e
            raise
        except BaseException as e:  # cancelled: waiters must not wait forever
            flight.error = trio.TooSlowError(f"{key!r}: the fetch they waited on was cancelled")
            raise
        finally:
            del self._flights[key]
            flight.done.set()
