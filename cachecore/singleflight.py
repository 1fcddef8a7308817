"""Concurrent callers asking for the same key share one call: trio tasks
(`SingleFlight`) or threads (`ThreadSingleFlight`, for work that runs in
worker threads from start to end, such as the HTTP download manager)."""
from __future__ import annotations

import threading
from typing import Awaitable, Callable, Hashable

import trio


def _copy_of(error: BaseException) -> BaseException:
    # A fresh exception per waiter: re-raising one object from many tasks or
    # threads would splice their tracebacks together.
    return type(error)(*error.args)


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
                raise _copy_of(flight.error)
            return flight.result
        flight = self._flights[key] = _Flight()
        try:
            flight.result = await fn()
            return flight.result
        except Exception as e:
            flight.error = e
            raise
        except BaseException:  # cancelled: waiters must not wait forever
            flight.error = trio.TooSlowError(f"{key!r}: the fetch they waited on was cancelled")
            raise
        finally:
            del self._flights[key]
            flight.done.set()


    async def run_many(self, keys: list[Hashable], fn: Callable[..., Awaitable[dict]]) -> dict:
        """Lead, in one call, the flights of the keys nobody leads yet:
        `fn(led, settle)` answers {key: its result or its exception} for each
        key led, and may call settle(key, result or exception) on the event
        loop to end a key's flight before it returns. The other keys are
        left to their leaders, unwaited for. Returns fn's answer."""
        led = [key for key in keys if key not in self._flights]
        flights = {key: self._flights.setdefault(key, _Flight()) for key in led}

        def settle(key: Hashable, outcome) -> None:
            flight = flights.pop(key, None)
            if flight is None:
                return  # settled already
            del self._flights[key]
            if isinstance(outcome, BaseException):
                flight.error = outcome
            else:
                flight.result = outcome
            flight.done.set()

        if not led:
            return {}
        try:
            outcome = await fn(led, settle)
        except Exception as e:
            for key in list(flights):
                settle(key, e)
            raise
        except BaseException:  # cancelled: waiters must not wait forever
            for key in list(flights):
                settle(key, trio.TooSlowError(f"{key!r}: the fetch they waited on was cancelled"))
            raise
        for key, result in outcome.items():
            settle(key, result)
        return outcome


class _ThreadFlight:
    __slots__ = ("running", "result", "error")

    def __init__(self):
        # Held by the leader until the call ended; waiters pass through it
        # one by one. (A Lock costs a tenth of an Event to make: 0.3 vs 3 us.)
        self.running = threading.Lock()
        self.running.acquire()
        self.result = None
        self.error: BaseException | None = None


class ThreadSingleFlight:
    """`SingleFlight` for threads. `joined` counts the calls that waited on
    another's instead of making their own."""

    def __init__(self):
        self._lock = threading.Lock()
        self._flights: dict[Hashable, _ThreadFlight] = {}
        self.joined = 0

    def __len__(self):
        return len(self._flights)

    def run(self, key: Hashable, fn: Callable[[], object]):
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _ThreadFlight()
            else:
                self.joined += 1
        if not leader:
            with flight.running:
                pass
            if flight.error is not None:
                raise _copy_of(flight.error)
            return flight.result
        try:
            flight.result = fn()
            return flight.result
        except Exception as e:
            flight.error = e
            raise
        except BaseException as e:  # KeyboardInterrupt, SystemExit: waiters must not wait forever
            flight.error = RuntimeError(f"{key!r}: the call they waited on was interrupted ({e!r})")
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.running.release()
