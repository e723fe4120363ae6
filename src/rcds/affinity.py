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

Where the kernel, not Python, takes most of the time (file creation on a long-used ext4 can cost ten
times what it costs on a fresh one), one CPU queues system calls that could run side by side, so a
watcher spreads the threads again once the kernel's share of a busy second passes 70%.

The pinning is per thread and undone when the block ends; threads and processes started inside the
block inherit it, so work that wants several CPUs (the small-file workers of ingest) must be started
outside it.

``RCDS_ONE_CPU=0`` in the environment turns it off (a site that places its own processes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator

from .logs import fields

log = logging.getLogger("rcds.affinity")

__all__ = ["ENV", "threads_on_one_cpu"]

ENV = "RCDS_ONE_CPU"
CHECK_SECONDS = 0.25  # how often the block's threads' CPU time is looked at...
WINDOW_CHECKS = 4  # ...over the last second: spread when they kept their CPU busy (BUSY) with
BUSY = 0.6  # mostly kernel time (KERNEL_SHARE)
KERNEL_SHARE = 0.7  # into a fresh ext4 a cold export peaks at 0.49 over a second; a slow one at 0.8-0.97


def _stat_after_name(path: str) -> list[bytes]:
    """The fields of a ``/proc/.../stat`` file after the command name, from field 3 on (the name, field
    2, may hold spaces and parentheses: the split is at the last ')'). Raises OSError."""
    with open(path, "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def _current_cpu() -> int | None:
    """The CPU this thread last ran on (field 39 of ``/proc/thread-self/stat``), or None."""
    try:
        return int(_stat_after_name("/proc/thread-self/stat")[36])
    except (OSError, ValueError, IndexError):
        return None


class _KernelWatch(threading.Thread):
    """Spreads the block's threads over every allowed CPU again once their time goes mostly to the
    kernel: system calls run in parallel whatever the GIL, so file creation on a slow file system (a
    long-used ext4 where each new file costs ~0.4 ms of kernel time) is better spread than queued on one
    CPU. Measured into such a file system: a cold export took 12.3-12.5 s on one CPU (user 3.4 s, system
    8.9 s), 10.4-11.0 s on two, 11.2-11.3 s spread by this after its first second or two; into a fresh
    ext4 the kernel's share of a second stays under 50% and the threads stay on one CPU.

    Only the block's threads (the caller and those started since) are counted, from
    ``/proc/self/task/<tid>/stat``: in a server, other threads' work says nothing about these."""

    def __init__(self, allowed: set[int], caller: int, before: set[str]) -> None:
        super().__init__(name="rcds-affinity", daemon=True)
        self.allowed, self.caller, self.before = allowed, caller, before
        self.stop = threading.Event()

    def _tids(self) -> set[int]:
        try:
            return {*map(int, set(os.listdir("/proc/self/task")) - self.before), self.caller}
        except OSError:
            return {self.caller}

    def run(self) -> None:
        last = _threads_cpu(self._tids())
        ticks: list[tuple[float, float, float]] = []  # (seconds, user, system) of each interval
        started = time.monotonic()
        while not self.stop.wait(CHECK_SECONDS):
            now = time.monotonic()
            current = _threads_cpu(self._tids())
            user = sum(u - last[tid][0] for tid, (u, _) in current.items() if tid in last)
            system = sum(s - last[tid][1] for tid, (_, s) in current.items() if tid in last)
            last = current
            ticks = [*ticks[-(WINDOW_CHECKS - 1) :], (now - started, user, system)]
            started = now
            if len(ticks) < WINDOW_CHECKS:
                continue
            seconds = sum(t[0] for t in ticks)
            user, system = sum(t[1] for t in ticks), sum(t[2] for t in ticks)
            cpu = user + system
            if cpu >= BUSY * seconds and system >= KERNEL_SHARE * cpu:
                self._spread()
                log.info(
                    "threads spread over every CPU: the kernel takes most of their time",
                    extra=fields(kernel_share=round(system / cpu, 2)),
                )
                return

    def _spread(self) -> None:
        """The block's threads back on the allowed CPUs."""
        for tid in self._tids():
            with contextlib.suppress(OSError):  # a thread that has ended meanwhile
                os.sched_setaffinity(tid, self.allowed)


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _threads_cpu(tids: set[int]) -> dict[int, tuple[float, float]]:
    """User and system seconds of each of these threads of this process (those still running)."""
    out: dict[int, tuple[float, float]] = {}
    for tid in tids:
        try:
            values = _stat_after_name(f"/proc/self/task/{tid}/stat")
        except OSError:
            continue
        out[tid] = (int(values[11]) / _TICK, int(values[12]) / _TICK)  # utime, stime: fields 14 and 15
    return out


@contextlib.contextmanager
def threads_on_one_cpu() -> Iterator[int | None]:
    """Run the calling thread, and the threads it starts inside the block, on one of the CPUs it may
    use: the one it is on, so that the kernel's choice stands. Yields that CPU, or None where nothing
    was changed (one CPU allowed, no affinity support, ``RCDS_ONE_CPU=0``). If those threads' time goes
    mostly to the kernel for a while, they get every allowed CPU back (``_KernelWatch``). The calling
    thread gets its former CPUs back at the end."""
    if os.environ.get(ENV, "1") == "0" or not hasattr(os, "sched_setaffinity"):
        yield None
        return
    try:
        allowed = os.sched_getaffinity(0)
        before = set(os.listdir("/proc/self/task"))
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
    watch = _KernelWatch(allowed, threading.get_native_id(), before)
    watch.start()
    try:
        yield cpu
    finally:
        watch.stop.set()
        watch.join()
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, allowed)
