"""Progress bars for long client work (uploads, downloads), shown only to a person at a terminal.

Without tqdm (the job client on a bare python3) there are none.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

try:
    from tqdm import tqdm
except ImportError:  # a bare python3 (the job client): no bars
    HAVE_TQDM = False
else:
    HAVE_TQDM = True


class Progress:
    """A byte counter with rate and ETA; silent when disabled or when stderr is not a terminal."""

    def __init__(self, total: int | None, description: str, enabled: bool = True) -> None:
        self._bar: tqdm[Any] | None = None
        if enabled and HAVE_TQDM and sys.stderr.isatty():
            self._bar = tqdm(
                total=total,
                desc=description,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                dynamic_ncols=True,
                leave=False,
                file=sys.stderr,
            )

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def reset(self) -> None:
        """Start again from zero (an upload retried on another server)."""
        if self._bar is not None:
            self._bar.reset()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
