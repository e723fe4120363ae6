"""Keeping a process's Python threads on one CPU while they hand the GIL back and forth.

Downloading and writing thousands of small files from eight threads means a GIL hand-off at nearly
every system call. When the threads run on different CPUs, each hand-off is a cross-CPU wake-up (an
inter-processor interrupt, a VM exit on a virtual machine) followed by the releasing thread blocking
again: a cold ``rcds shrinkwrap`` of 20,000 files spent about 30% of its CPU samples in futex wake-ups
and context switches (``perf``). On one CPU the woken thread simply runs when the current one blocks.
Measured on 2 CPUs, 1 GiB in 20,000 files, each run into a fresh ext4: a cold export from 8.1 s and
~10 client CPU s to 5.0 s and ~5; a cold ``rcds get`` from 6.5 s to 5.2 s; an initial ``rcds replicate``
from 4.1 s to 3.5 s. The threads lose little: under the GIL only one of them runs Python at a time, and
the work they do outside it (inflating with ISA-L, hashing) is a small part of the whole.

The pinning is per thread and undone when the block ends; threads and processes started inside the
block inherit it, so work that wants several CPUs (the small-file workers of ingest) must be started
outside it.

``RCDS_ONE_CPU=0`` in the environment turns it off (a site that places its own processes).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

log = logging.getLogger("rcds.affinity")

__all__ = ["ENV", "threads_on_one_cpu"]

ENV = "RCDS_ONE_CPU"


def _current_cpu() -> int | None:
    """The CPU this thread last ran on (field 39 of ``/proc/thread-self/stat``), or None."""
    try:
        with open("/proc/thread-self/stat", "rb") as f:
            stat = f.read()
        # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
        return int(stat.rsplit(b")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def threads_on_one_cpu() -> Iterator[int | None]:
    """Run the calling thread, and the threads it starts inside the block, on one of the CPUs it may
    use: the one it is on, so that the kernel's choice stands. Yields that CPU, or None where nothing
    was changed (one CPU allowed, no affinity support, ``RCDS_ONE_CPU=0``). The calling thread gets
    its former CPUs back at the end; threads started inside keep the one CPU."""
    if os.environ.get(ENV, "1") == "0" or not hasattr(os, "sched_setaffinity"):
        yield None
        return
    try:
        allowed = os.sched_getaffinity(0)
    except OSError:
        yield None
        return
    cpu = _current_cpu()
    if len(allowed) < 2 or cpu is None or cpu not in allowed:
        yield None
        return
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:  # a container's seccomp policy, for one
        log.debug("cannot set the CPU affinity: %s", exc)
        yield None
        return
    try:
        yield cpu
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, allowed)
