"""External tools some shrinkwrap tests need (strace, squashfs-tools, squashfuse, skopeo, umoci,
docker-registry): a test skips when one is missing, unless ``RCDS_REQUIRE_TOOLS=1`` (CI), where a
missing tool is a failure."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_ENV = "RCDS_REQUIRE_TOOLS"
SBIN_DIRS = "/usr/sbin:/usr/local/sbin:/sbin"


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=SBIN_DIRS)
    if path is not None:
        return path
    message = f"{name} not found (Debian package {package})"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message}, and {REQUIRE_ENV}=1 requires it")
    pytest.skip(message)
