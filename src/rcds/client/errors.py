"""The client's errors. Each carries the exit code the command line uses for it (see docs/client.md)."""

from __future__ import annotations


class ClientError(Exception):
    """Something the user must fix or look at; exit code 1."""

    exit_code = 1


class WaitTimeout(ClientError):
    """The CID did not appear in time."""

    exit_code = 3


class ServersUnavailable(ClientError):
    """No server gave a usable answer in any round (down, hung, overloaded)."""

    exit_code = 4

    def __init__(self, what: str, attempts: list[str]) -> None:
        self.attempts = attempts
        # The same answer in every round is said once, with how often: the message stays short.
        counts: dict[str, int] = {}
        for a in attempts:
            counts[a] = counts.get(a, 0) + 1
        lines = "\n".join(f"  {a}" + (f" ({n} times)" if n > 1 else "") for a, n in counts.items())
        super().__init__(f"{what} failed on every server:\n{lines or '  (no server configured)'}")


class RequestRefused(ClientError):
    """A server refused the request itself (bad CID, not authorised, too large): retrying cannot help."""

    exit_code = 5

    def __init__(self, server: str, status: int, message: str) -> None:
        self.server, self.status, self.message = server, status, message
        super().__init__(f"{server} refused the request (HTTP {status}): {message}")


class PublishFailed(ClientError):
    """The server accepted the upload but could not publish it (for example, a rejected tarball)."""

    exit_code = 5


__all__ = ["ClientError", "PublishFailed", "RequestRefused", "ServersUnavailable", "WaitTimeout"]
