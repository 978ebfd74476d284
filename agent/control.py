"""The device's local control channel: one process owns a state dir, others ask it.

- `StateDirLock`: an exclusive flock on `<state_dir>/agent.lock`, held by `edgeship agent run` for
  its whole life and by `edgeship agent install` while it installs into a stopped agent. The state
  dir is never written by two processes at once.
- `ControlServer`: a unix stream socket `<state_dir>/control.sock`, owned by the running agent.
  A client sends one JSON request line (an install also passes the open archive as a file
  descriptor, SCM_RIGHTS, so the agent reads files its own user could not open), and gets JSON reply
  lines until one has `final: true`.

Sockets are bound and reached through /proc/self/fd/<dir fd>/control.sock: a state dir path may be
longer than the 108 bytes AF_UNIX allows.

Errors: ControlError(RuntimeError) — no agent answers, or it broke the conversation; one line.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("edgeship.agent.control")

SOCKET_NAME = "control.sock"
LOCK_NAME = "agent.lock"
MAX_LINE = 64 * 1024


class ControlError(RuntimeError):
    """No agent answers on the control socket, or it broke off; the message says what to do."""


class ControlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    op: Literal["install"]
    allow_downgrade: bool = False
    replaces: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default=[], max_length=16)


class ControlReply(BaseModel):
    model_config = ConfigDict(extra="ignore")
    state: str = ""  # an UpdateState value, or "" before the update started
    ok: bool = True
    final: bool = False
    code: str = ""
    reason: str = ""
    bundle: str = ""  # name@version


class StateDirLock:
    """An exclusive, non-blocking flock on the state dir; released when the process ends, however it ends."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextmanager
def _in_dir(directory: Path) -> Iterator[str]:
    """A short path to `directory`/control.sock for bind/connect, valid while the block runs."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET_NAME}"
    finally:
        os.close(fd)


def _send_line(conn: socket.socket, model: BaseModel, fds: tuple[int, ...] | list[int] = ()) -> None:
    data = model.model_dump_json().encode() + b"\n"
    if fds:
        socket.send_fds(conn, [data], list(fds))
    else:
        conn.sendall(data)


class _Lines:
    """Newline-delimited reads from a stream socket (the first read may carry file descriptors)."""

    def __init__(self, conn: socket.socket):
        self.conn, self.buf, self.fds = conn, b"", []

    def read(self, *, with_fds: bool = False) -> bytes | None:
        while b"\n" not in self.buf:
            if with_fds:
                data, fds, _, _ = socket.recv_fds(self.conn, MAX_LINE, 4)
                self.fds.extend(fds)
            else:
                data = self.conn.recv(MAX_LINE)
            if not data:
                return None
            self.buf += data
            if len(self.buf) > MAX_LINE:
                return None
        line, self.buf = self.buf.split(b"\n", 1)
        return line


Handler = Callable[[ControlRequest, list[int], Callable[[ControlReply], None]], None]


class ControlServer:
    """The running agent's control socket: one thread accepts, one thread per conversation."""

    def __init__(self, state_dir: Path, handler: Handler):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / SOCKET_NAME
        self._handler = handler
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind (replacing a stale socket: the caller holds the state-dir lock) and start accepting."""
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with _in_dir(self.state_dir) as short:
            old = os.umask(0o077)  # only the agent's user (and root) may install
            try:
                sock.bind(short)
            finally:
                os.umask(old)
        sock.listen(8)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name="edgeship-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
            self.path.unlink(missing_ok=True)

    def _accept(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="edgeship-control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        lines = _Lines(conn)
        try:
            raw = lines.read(with_fds=True)
            if raw is None:
                return
            try:
                req = ControlRequest.model_validate_json(raw)
            except ValidationError as exc:
                _send_line(conn, ControlReply(ok=False, final=True, code="bad_request", reason=str(exc).splitlines()[0]))
                return

            def send(reply: ControlReply) -> None:
                try:
                    _send_line(conn, reply)
                except OSError:  # the client went away; the install goes on and its outcome is persisted
                    pass

            self._handler(req, lines.fds, send)
        except Exception:
            log.exception("control request failed")
        finally:
            for fd in lines.fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            conn.close()


def connect(state_dir: Path, *, timeout: float | None = None) -> socket.socket | None:
    """A connection to the agent that owns `state_dir`, or None when no agent listens there."""
    path = Path(state_dir) / SOCKET_NAME
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _in_dir(path.parent) as short:
            sock.connect(short)
    except (ConnectionRefusedError, FileNotFoundError):  # a socket left behind by a killed agent
        sock.close()
        return None
    return sock


def request(conn: socket.socket, req: ControlRequest, *, fds: tuple[int, ...] | list[int] = ()) -> Iterator[ControlReply]:
    """Send `req` and yield the replies up to and including the final one."""
    _send_line(conn, req, fds)
    lines = _Lines(conn)
    while True:
        try:
            raw = lines.read()
        except OSError as exc:
            raise ControlError(f"lost the agent's control socket ({exc})") from None
        if raw is None:
            raise ControlError("the agent closed the control socket before the install finished (did it stop?); "
                               "`edgeship agent status` shows the outcome")
        try:
            reply = ControlReply.model_validate(json.loads(raw))
        except (ValueError, ValidationError):
            raise ControlError(f"the agent sent an unreadable reply: {raw[:80]!r}") from None
        yield reply
        if reply.final:
            return
