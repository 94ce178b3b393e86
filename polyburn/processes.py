"""Who is writing: this host's name and whether a process of this host still runs."""

from __future__ import annotations

import os
import socket


def host_name() -> str:
    """This host's name, safe as a file name segment."""
    return socket.gethostname().replace("/", "_") or "localhost"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (a zombie counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
