"""What the job client needs to run on the oldest ``python3`` of a grid worker node (3.9, EL9).

The modules ``rcds wait`` and ``rcds get`` use are bundled into one file that runs there with nothing
installed (``rcds.client.bundle``). They keep to 3.9 at run time; the few newer features they would like
are spelled through here.
"""

from __future__ import annotations

import sys
from typing import Any

# ``@dataclass(**SLOTS)``: slots (less memory per catalog row) where dataclasses can make them (3.10+).
SLOTS: dict[str, Any] = {"slots": True} if sys.version_info >= (3, 10) else {}

__all__ = ["SLOTS"]
