"""Bench only: the CPU time of each request inside rez-lazyfs's FUSE handlers.

`time_handlers(LazyOperations)` wraps every request handler of the class (the
names pyfuse3.Operations defines) to take the CPU time (user + system,
CLOCK_THREAD_CPUTIME_ID) the request's own trio task spends from the handler's
start to its end: a trio instrument adds up each task's CPU step by step, so a
handler that awaits (a worker thread, a listing) is not charged for what other
tasks did meanwhile. What pyfuse3 does around a handler (reading the request,
dispatching it, sending the reply) and trio's scheduling are outside it. The
instrument's own cost (two clock reads per task step, ~1.5 us) lands outside
the handlers too. With `log`, each request is also noted as the path it
names, for request_cost.py to replay: ("lookup", parent, name),
("read", path, offset, size), ("readdir", path, start), ("getattr", path).
"""
from __future__ import annotations

import collections
import functools
import os
import time

import pyfuse3
import trio

clock = time.thread_time_ns


class TaskCpu(trio.abc.Instrument):
    """Each task's CPU time, summed over its steps (they run on this thread)."""

    def __init__(self):
        self.run = trio.lowlevel.current_trio_token()
        self.total: dict = collections.defaultdict(int)
        self.step_started = 0
        self.steps: collections.Counter = collections.Counter()  # task name -> steps run

    def before_task_step(self, task):
        self.steps[task.name] += 1
        self.step_started = clock()

    def after_task_step(self, task):
        self.total[task] += clock() - self.step_started

    def task_exited(self, task):
        self.total.pop(task, None)

    def now(self, task) -> int:
        """The task's CPU so far, this step included (called inside a step)."""
        return self.total[task] + clock() - self.step_started


def distribution(values: list[int]) -> dict:
    """Microseconds: how many, the mean and percentiles of some requests' nanoseconds."""
    values = sorted(values)

    def at(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] / 1000, 1)

    return {"requests": len(values), "mean": round(sum(values) / len(values) / 1000, 1),
            "p10": at(0.10), "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": at(1.0)}


def time_gc() -> list[list]:
    """Times every collection of Python's cyclic garbage collector from now on:
    [[when (time.monotonic), generation, CPU ns of the collecting thread, whether
    that was the main thread (the event loop's)], ...]."""
    import gc
    import threading

    collections_: list[list] = []
    started: dict[int, tuple[float, int]] = {}

    def callback(phase: str, info: dict) -> None:
        ident = threading.get_ident()
        if phase == "start":
            started[ident] = (time.monotonic(), clock())
        elif ident in started:
            when, cpu = started.pop(ident)
            collections_.append([when, info["generation"], clock() - cpu,
                                 ident == threading.main_thread().ident])

    gc.callbacks.append(callback)
    return collections_


def _named(ops, name: str, args: tuple):
    """The request by path ([alias, relpath], str), not inode: replayable in another run."""
    try:
        if name in ("lookup", "read", "readdir", "getattr"):
            alias, relpath = ops.inodes.key(args[0])
            where = [alias, os.fsdecode(relpath)]
    except KeyError:
        return None
    if name == "lookup":
        return [name, where, os.fsdecode(args[1])]
    if name == "read":
        return [name, where, args[1], args[2]]
    if name == "readdir":
        return [name, where, args[1]]
    if name == "getattr":
        return [name, where]
    return None


def time_handlers(cls, log: list | None = None,
                  instrument: list | None = None) -> dict[str, list[int]]:
    """Wrap the handlers of `cls` (once; later calls return the same record):
    returns {handler: [ns of each request, in order]}. `instrument` (a list) gets
    the TaskCpu of the trio run in progress, which counts the steps of each task."""
    if "_handler_cpu" in vars(cls):
        return cls._handler_cpu
    spent: dict[str, list[int]] = collections.defaultdict(list)
    cls._handler_cpu = spent
    instrument = [] if instrument is None else instrument

    def timed(name, handler):
        @functools.wraps(handler)
        async def wrapper(self, *args):
            if not instrument or instrument[0].run is not trio.lowlevel.current_trio_token():
                instrument[:] = [TaskCpu()]  # the first request of this trio run
                trio.lowlevel.add_instrument(instrument[0])
            if log is not None and (named := _named(self, name, args)) is not None:
                log.append(named)
            cpu, task = instrument[0], trio.lowlevel.current_task()
            started = cpu.now(task)
            try:
                return await handler(self, *args)
            finally:
                spent[name].append(cpu.now(task) - started)

        return wrapper

    for name, handler in list(vars(cls).items()):
        if name in vars(pyfuse3.Operations) and name != "init":  # the request handlers
            setattr(cls, name, timed(name, handler))
    return spent
