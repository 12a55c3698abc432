"""Worker processes of the entry points (data generation, ClevrSkills import, evaluation).

``spawn_pool(workers, initializer, initargs)`` is a ``ProcessPoolExecutor`` whose workers are
spawned (never forked: ManiSkill/PhysX and torch threads do not survive a fork), ignore Ctrl-C
(the parent handles it: running jobs finish, no new ones start) and end when the parent process
ends abruptly. Why the last: a ``ProcessPoolExecutor`` worker waits on a queue whose write end
its siblings also hold, so when the parent was killed (SIGKILL, or SIGTERM, which skips Python's
exit handlers) its workers never saw the end and ran on as orphans (measured: an evaluation
worker with parent pid 1, holding a core, hours later). Each worker now watches the parent's
sentinel (``multiprocessing.parent_process()``) from a daemon thread and exits when it closes.
A parent that exits normally waits for its workers first, as before.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor

SPAWN = mp.get_context("spawn")  # also for the queues shared with the workers
ORPHAN_EXIT_STATUS = 3  # a worker's exit status when its parent is gone


def spawn_pool(workers: int, initializer=None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """``workers`` spawned processes that run ``initializer(*initargs)`` first (see the module docstring)."""
    return ProcessPoolExecutor(int(workers), mp_context=SPAWN, initializer=_start_worker,
                               initargs=(initializer, tuple(initargs)))


def _start_worker(initializer, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    parent = mp.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), name="exit-with-parent", daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def _exit_with(parent) -> None:
    parent.join()  # returns when the parent's sentinel closes: the parent process has ended
    os._exit(ORPHAN_EXIT_STATUS)


__all__ = ["SPAWN", "spawn_pool", "ORPHAN_EXIT_STATUS"]
