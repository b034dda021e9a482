"""systemd readiness: ``sd_notify`` states sent to ``$NOTIFY_SOCKET``.

Under a ``Type=notify`` unit, systemd sets ``NOTIFY_SOCKET`` to a unix datagram
socket (a path, or ``@name`` in the abstract namespace) and waits for
``READY=1`` before it counts the service as started; ``STOPPING=1`` tells it a
stop is under way. Without the variable every call is a no-op.

The protocol is one datagram, so it is written here with :mod:`socket` rather
than taken from a library: python-systemd needs libsystemd's headers to build,
and ``sdnotify`` on PyPI is unmaintained. Only unix sockets are supported
(systemd's ``vsock:`` addresses are for VMs and are ignored).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("imgserve.notify")

READY = "READY=1"
STOPPING = "STOPPING=1"


def socket_address(value: str) -> str | None:
    """The ``AF_UNIX`` address for a ``NOTIFY_SOCKET`` value (None: not a unix one).
    A leading ``@`` names the abstract namespace, which Python spells with a NUL."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1``, ...) to systemd; True if sent.

    A failure is logged, never raised: readiness is advice to the supervisor,
    not a reason for the daemon to stop."""
    address = socket_address(environ.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("systemd notification %s not sent: %s", state, exc)
        return False
    return True
