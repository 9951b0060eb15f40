"""systemd's sd_notify protocol in a few lines of standard library.

The daemon tells systemd it is ready (``READY=1``), alive (``WATCHDOG=1``), reloading
(``RELOADING=1``) and stopping (``STOPPING=1``). Outside systemd (no ``NOTIFY_SOCKET``) every
call is a no-op, so the same code runs in a container or a terminal.
"""

from __future__ import annotations

import os
import socket


def _socket_address(raw: str) -> str | None:
    """The address to send to, or None for a form this module does not speak."""
    if raw.startswith("@"):
        # Linux abstract namespace: systemd writes it with a leading '@' for the NUL byte.
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None  # e.g. systemd 254's "vsock:" addresses, which a service never gets here


def notify(message: str) -> bool:
    """Send one sd_notify message; True if it was sent, False outside systemd or on failure."""
    raw = os.environ.get("NOTIFY_SOCKET", "")
    address = _socket_address(raw) if raw else None
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError:
        # A lost notification must never take the daemon down; systemd's watchdog is the judge.
        return False
    return True


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds systemd set for this process (send WATCHDOG=1 at least
    every half of it), or None when there is no watchdog for us."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        # The variables are inherited by children; only the process they name is watched.
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1_000_000
