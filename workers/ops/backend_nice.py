"""An import's ``--nice``, carried to the Postgres backends that do most of its work.

Lowering the import process's own CPU priority leaves its cost where it mostly is: in the
Postgres backends that run its batches, which compete with the workers' backends for the
same cores when Postgres runs on the import's machine. So each connection of the import's
pool lowers its backend's priority too, where that is both possible and certain to touch the
right process:

- **Certain.** Postgres says which TCP connection the session is (its own address and port,
  and the client's). The backend's pid counts only if this machine's kernel lists a socket
  with exactly those ends (``/proc/net/tcp``, ``tcp6``) and that socket is one of the pid's
  open files. A Postgres on another host, in another network or pid namespace, behind a
  pooler or a proxy, or reached over a Unix socket never passes: then nothing is reniced.
- **Possible.** Renicing another user's process needs root or ``CAP_SYS_NICE``.

What was done is reported once (``import.backend_nice``), never an error: the import runs
the same without it. A backend's priority ends with it; the import's connections close with
the import.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import asyncpg

_SESSION = "SELECT inet_server_addr() AS saddr, inet_server_port() AS sport, inet_client_addr() AS caddr, inet_client_port() AS cport"  # noqa: E501


@dataclass(frozen=True, slots=True)
class Outcome:
    pid: int
    applied: bool
    why: str  # "" when applied; else what stood in the way


def _hex_end(addr: str, port: int) -> str:
    """An address and port as /proc/net/tcp{,6} writes them: the address's 32-bit words in
    host (little-endian) order, in hex, then the port."""
    ip = ipaddress.ip_address(addr)
    raw = ip.packed
    words = [raw[i : i + 4][::-1].hex().upper() for i in range(0, len(raw), 4)]
    return f"{''.join(words)}:{port:04X}"


def socket_inodes(local: tuple[str, int], remote: tuple[str, int], proc: Path = Path("/proc")) -> set[int]:
    """The inodes of this namespace's TCP sockets whose ends are exactly ``local`` and
    ``remote`` (an IPv4 address may also show as IPv4-mapped in tcp6)."""
    wanted: set[tuple[str, str]] = {(_hex_end(*local), _hex_end(*remote))}
    lip, rip = ipaddress.ip_address(local[0]), ipaddress.ip_address(remote[0])
    if lip.version == 4 and rip.version == 4:
        mapped = (ipaddress.IPv6Address(f"::ffff:{lip}"), ipaddress.IPv6Address(f"::ffff:{rip}"))
        wanted.add((_hex_end(str(mapped[0]), local[1]), _hex_end(str(mapped[1]), remote[1])))
    found: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and (cols[1], cols[2]) in wanted:
                found.add(int(cols[9]))
    return found


def holds_socket(pid: int, inodes: set[int], proc: Path = Path("/proc")) -> bool:
    targets = {f"socket:[{i}]" for i in inodes}
    try:
        fds = list((proc / str(pid) / "fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) in targets:
                return True
        except OSError:
            continue
    return False


async def lower(conn: asyncpg.Connection, niceness: int) -> Outcome:
    """Lower ``conn``'s backend's CPU priority by ``niceness``, where it verifiably is a
    process of this machine (see the module's text)."""
    pid = conn.get_server_pid()
    if niceness <= 0:
        return Outcome(pid, False, "--nice 0")
    row = await conn.fetchrow(_SESSION)
    if row is None or row["caddr"] is None or row["saddr"] is None:
        return Outcome(pid, False, "not a TCP connection")
    server = (str(row["saddr"].ip if hasattr(row["saddr"], "ip") else row["saddr"]), int(row["sport"]))
    client = (str(row["caddr"].ip if hasattr(row["caddr"], "ip") else row["caddr"]), int(row["cport"]))
    inodes = socket_inodes(server, client)
    if not inodes:
        return Outcome(pid, False, "Postgres's end of the connection is not on this machine")
    if not holds_socket(pid, inodes):
        return Outcome(pid, False, f"pid {pid} does not hold this connection's socket (or cannot be read)")
    try:
        current = os.getpriority(os.PRIO_PROCESS, pid)
        os.setpriority(os.PRIO_PROCESS, pid, min(19, max(current, current + niceness)))
    except OSError as exc:
        return Outcome(pid, False, exc.strerror or repr(exc))
    return Outcome(pid, True, "")
