"""Bench only: profile_warm.py and request_cost.py put this directory on the
daemon's PYTHONPATH with REZ_LAZYFS_HANDLER_CPU=DIR set (any other process
imports this and does nothing). The daemon's handlers are timed
(handler_timing.py), and so is the garbage collector; at exit it writes
DIR/PID.json, {handler: [nanoseconds of each request, in order]},
DIR/PID-gc.json (time_gc), DIR/PID-steps.json (the trio task steps run, by task
name), and with REZ_LAZYFS_REQUEST_LOG=1 also DIR/PID-requests.json, the requests by
path (request_cost.py replays them).
"""
import os


def _install(out_dir: str, log_requests: bool) -> None:
    import atexit
    import json

    from handler_timing import time_gc, time_handlers

    from fusefs.operations import LazyOperations

    log = [] if log_requests else None
    instrument: list = []
    spent = time_handlers(LazyOperations, log, instrument)
    collected = time_gc()

    def write() -> None:
        if not spent:
            return  # not the daemon (the mount command that started it)
        with open(os.path.join(out_dir, f"{os.getpid()}.json"), "w") as f:
            json.dump(spent, f)
        with open(os.path.join(out_dir, f"{os.getpid()}-gc.json"), "w") as f:
            json.dump(collected, f)
        with open(os.path.join(out_dir, f"{os.getpid()}-steps.json"), "w") as f:
            json.dump(instrument[0].steps if instrument else {}, f)
        if log is not None:
            with open(os.path.join(out_dir, f"{os.getpid()}-requests.json"), "w") as f:
                json.dump(log, f)

    atexit.register(write)


if os.environ.get("REZ_LAZYFS_HANDLER_CPU"):
    _install(os.environ["REZ_LAZYFS_HANDLER_CPU"], bool(os.environ.get("REZ_LAZYFS_REQUEST_LOG")))
