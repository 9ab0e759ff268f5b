"""Processes and their listening sockets, read from /proc (Linux)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

_LISTEN = "0A"


def children(pid: int) -> list[int]:
    """The PIDs of the live processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            # The command name may hold spaces and parentheses: fields follow the last ')'.
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def listening_sockets(port: int) -> set[int]:
    """Inodes of the TCP sockets listening on `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(int(fields[9]))
    return inodes


def sockets_of(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` holds open."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    with contextlib.suppress(OSError):
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                target = os.readlink(f"{fd_dir}/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def listeners_by_process(pid: int, port: int) -> dict[int, set[int]]:
    """For `pid` and each of its children that listens on `port`: the listening sockets."""
    listening = listening_sockets(port)
    held = {p: sockets_of(p) & listening for p in [pid, *children(pid)]}
    return {p: inodes for p, inodes in held.items() if inodes}


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def connection_owner(pids: list[int], server_port: int, client_port: int) -> int | None:
    """Which of `pids` holds the server side of the loopback TCP connection between
    `server_port` and `client_port` (None: none of them, or no such connection)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local = int(fields[1].rsplit(":", 1)[1], 16)
                remote = int(fields[2].rsplit(":", 1)[1], 16)
                if (local, remote) == (server_port, client_port):
                    inodes.add(int(fields[9]))
    for pid in pids:
        if sockets_of(pid) & inodes:
            return pid
    return None


def worker_pids(supervisor: int, port: int) -> list[int]:
    """The children of `supervisor` that hold a socket listening on `port`, in PID order."""
    return sorted(pid for pid in listeners_by_process(supervisor, port) if pid != supervisor)
