"""Where the server ``servelm serve`` started listens, for the commands that talk to
it (``servelm models list``): a small file in the data directory, written at start and
removed at exit, so ``serve --port 18000`` is found without repeating the port."""

from __future__ import annotations

import json
import os
from pathlib import Path

from servelm.config import Settings

STATE_FILE = "server.json"


def loopback_url(host: str, port: int) -> str:
    """The URL a local command reaches a server bound to ``host`` at (a wildcard
    address is reached on loopback)."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def write(settings: Settings) -> Path:
    path = settings.data_dir / STATE_FILE
    path.write_text(
        json.dumps({"url": loopback_url(settings.host, settings.port), "pid": os.getpid()})
    )
    return path


def remove(path: Path) -> None:
    """Remove the file if it is still this process's (a second server may have taken
    the data directory over since)."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        return


def running_url(settings: Settings) -> str | None:
    """The URL of the server last started with this data directory, if its process is
    still alive."""
    try:
        state = json.loads((settings.data_dir / STATE_FILE).read_text())
        pid, url = int(state["pid"]), str(state["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return url
