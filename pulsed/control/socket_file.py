"""The control socket's file and who may use it: publishing the socket
atomically with its mode and group, refusing a path a live daemon answers
on, removing only our own file, and checking each peer's credentials
(SO_PEERCRED): root, the daemon's own user and members of its group."""

from __future__ import annotations

import grp
import logging
import os
import pwd
import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from pulsed.errors import PulseError

log = logging.getLogger(__name__)

LISTEN_BACKLOG = min(socket.SOMAXCONN, 1024)  # a burst of pulsectl calls must not get EAGAIN
GROUP_CACHE_TTL = 60.0  # seconds a uid's group membership is remembered
PROBE_TIMEOUT = 1.0  # open(): seconds to wait for a live daemon at the path
MAX_SOCKET_PATH = 107  # AF_UNIX sun_path is 108 bytes with the final NUL
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlSocketError(PulseError):
    """The control socket could not be opened."""


class SocketInUse(ControlSocketError):
    """Another pulsed is listening on the control socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"control socket {path} is in use: another pulsed is running there "
                         "(it accepted a connection); stop it, or give this daemon another "
                         "daemon.socket and daemon.state_dir")


class Peer(NamedTuple):
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Peer:
    """The connecting process's pid, uid and gid, from the kernel (Linux)."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return Peer(*_UCRED.unpack(data))


def resolve_group(group: str | None) -> int | None:
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ControlSocketError(f"socket group {group!r} does not exist "
                                 "(daemon.socket_group)") from None


def check_existing(path: Path) -> None:
    """Refuse a path a live daemon answers on; a stale socket will be replaced."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlSocketError(f"{path} exists and is not a socket; remove it "
                                 "or set daemon.socket to another path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(os.fsencode(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("replacing stale control socket %s", path)
            return
        except (TimeoutError, BlockingIOError):  # a full backlog: alive, if slow
            raise SocketInUse(path) from None
        except OSError as exc:
            raise ControlSocketError(f"cannot check control socket {path}: "
                                     f"{exc}") from exc
    raise SocketInUse(path)


def publish(sock: socket.socket, temp: Path, path: Path, mode: int, gid: int | None) -> None:
    """Bind a temporary name, set its mode and group, listen, then rename it
    over ``path`` in one step."""
    sock.bind(os.fsencode(temp))
    try:
        os.chmod(temp, mode)  # not listening yet: nobody can connect meanwhile
        if gid is not None:
            os.chown(temp, -1, gid)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        os.rename(temp, path)  # atomic: a stale socket is replaced in one step
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def unlink_if_ours(path: Path, identity: tuple[int, int] | None) -> None:
    try:
        info = os.stat(path)
        if (info.st_dev, info.st_ino) == identity:
            os.unlink(path)
    except OSError:
        pass  # gone already, or replaced by another daemon: leave it


class PeerPolicy:
    """Who may talk: root, the daemon's user, and members of ``gid``
    (memberships looked up once a minute per uid)."""

    def __init__(self, gid: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._euid = os.geteuid()
        self._gid = gid
        self._clock = clock
        self._group_cache: dict[int, tuple[bool, float]] = {}

    def allowed(self, peer: Peer) -> bool:
        if peer.uid in (0, self._euid):
            return True
        if self._gid is None:
            return False
        if peer.gid == self._gid:
            return True
        now = self._clock()
        cached = self._group_cache.get(peer.uid)
        if cached is not None and cached[1] > now:
            return cached[0]
        allowed = _in_group(peer.uid, self._gid)
        self._group_cache[peer.uid] = (allowed, now + GROUP_CACHE_TTL)
        return allowed


def _in_group(uid: int, gid: int) -> bool:
    """Whether ``uid`` has ``gid`` as its primary or a supplementary group."""
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    if user.pw_gid == gid:
        return True
    try:
        return user.pw_name in grp.getgrgid(gid).gr_mem
    except KeyError:
        return False

