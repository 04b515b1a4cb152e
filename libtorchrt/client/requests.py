"""The requests a client's connection carries, and their answers (client process, I/O thread).

A request from a caller waits in :attr:`Requests.waiting` while there is no session
(at most ``connect_timeout``), is sent on the current session and stays in
:attr:`Requests.pending` until the server answers it: with outputs (viewing the
session's response arena, or frames), the pool's error raised again, or the data of a
query. Response slots whose last output tensor died go back to the server on the next
request (:attr:`Requests.releases`).

Two timers watch a request: its deadline plus :data:`MARGIN` (then its caller gets a
TimeoutError and the server a CANCEL), and its wait for a session. Both become moot
when the request moves on, so :class:`~..transport.loop.Deadlines` drops them.
"""

from __future__ import annotations

import collections
import logging
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch
import zmq

from .._plain import error_from_plain
from ..errors import ProtocolError, ServerConnectionError, TimeoutError
from ..transport import remote
from ..transport import tensors as tensor_io
from ..transport.loop import Deadlines
from ..transport.sockets import send
from ..transport.wire import DTYPES, TensorDesc

if TYPE_CHECKING:
    from .session import Session

__all__ = ["MARGIN", "Request", "Requests"]

log = logging.getLogger("libtorchrt.client")

#: The client waits this much past a request's timeout for the server's own
#: TimeoutError before it gives up on the server.
MARGIN = 2.0
#: Releases of response slots sent at most per message.
_MAX_RELEASES = 1 << 15


class Request:
    """A request (or query) on its way: its placement, future, session and deadline."""

    __slots__ = (
        "expired",
        "frames",
        "future",
        "header_fields",
        "id",
        "model",
        "offsets",
        "session",
        "timeout",
        "what",
    )

    def __init__(self, request_id: int, future: Future[Any], model: str = "", what: str = "") -> None:
        self.id = request_id
        self.future = future
        self.model = model
        #: a query's subject ("models", "health"); "" for an inference request
        self.what = what
        #: the fields of its INFER header, but for the releases added when it is sent
        self.header_fields: tuple[Any, ...] = ()
        self.frames: list[Any] = []
        #: request-arena slots it holds until the server answers
        self.offsets: list[int] = []
        self.timeout: float | None = None
        self.session: Session | None = None
        #: the caller got a TimeoutError; the server's answer is still awaited (to free
        #: the slots, which the server may still be reading)
        self.expired = False


class Requests:
    """Requests waiting for a session, sent and awaiting their answer (I/O thread only).

    Args:
        endpoint: the server's endpoint, for error messages.
        sock: the connection's DEALER socket (this thread's).
        free: gives a request's request-arena slots back (its offsets).
        connect_timeout: how long a request waits for a session.
    """

    def __init__(
        self, endpoint: str, sock: zmq.Socket, free: Callable[[Request], None], connect_timeout: float
    ) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.free = free
        self.connect_timeout = connect_timeout
        self.pending: dict[int, Request] = {}  # sent, awaiting an answer
        #: awaiting a session, by id, in the order they came (a dict: a timer finds and
        #: removes its request at once)
        self.waiting: dict[int, Request] = {}
        #: (session generation, offset) of response slots whose last tensor died
        self.releases: collections.deque[tuple[int, int]] = collections.deque()
        #: request id -> its deadline plus MARGIN (moot once answered or expired)
        self._deadlines: Deadlines[int] = Deadlines(self._unanswered)
        #: request id -> the end of its wait for a session (moot once sent or failed)
        self._session_waits: Deadlines[int] = Deadlines(self._unsent)

    def _unanswered(self, request_id: int) -> bool:
        request = self.pending.get(request_id)
        return request is not None and not request.expired

    def _unsent(self, request_id: int) -> bool:
        return request_id in self.waiting

    @property
    def timers(self) -> int:
        """How many timers are kept, live or moot (answered requests leave none behind
        for long: they are dropped as they reach the top)."""
        return len(self._deadlines) + len(self._session_waits)

    # ── from the inbox ─────────────────────────────────────────────────────────

    def admit(self, request: Request, session: Session | None) -> None:
        """A caller's request: sent on ``session``, or kept until there is one."""
        if session is None or session.lost:
            self.waiting[request.id] = request
            wait = self.connect_timeout if request.timeout is None else min(self.connect_timeout, request.timeout)
            self._session_waits.add(time.monotonic() + wait, request.id)
        else:
            self.send(request, session)

    def cancel(self, request_id: int) -> None:
        """The caller gave a request up: tell the server, if it has it."""
        if request_id in self.pending:
            self._send(remote.Cancel(request_id))

    def send(self, request: Request, session: Session) -> None:
        if request.offsets and session.response_arena is None:
            # placed in shared memory that this session (a new one) did not attach
            self.fail(request, ServerConnectionError("the session with the server changed", endpoint=self.endpoint))
            return
        request.session = session
        if request.what:
            header = remote.encode(remote.Query(request.id, request.what))
        else:
            releases = self._collect_releases(session)
            request_id, model, version, timeout, names, descs, blobs, single, *rest = request.header_fields
            infer = remote.Infer(request_id, model, version, timeout, names, descs, blobs, releases, single, *rest)
            try:
                header = remote.encode(infer)
            except Exception as e:  # checked in submit(); this request fails, not the client
                self.releases.extend((session.generation, offset) for offset in releases)
                self.fail(request, ProtocolError(f"cannot encode the request: {e!r}"))
                return
        self.pending[request.id] = request
        send(self.sock, header, request.frames, zero_copy=True)
        request.frames = []  # ZeroMQ holds them until sent
        if request.timeout is not None:
            self._deadlines.add(time.monotonic() + request.timeout + MARGIN, request.id)

    def resume(self, session: Session) -> None:
        """A session began: send the requests that waited for one, in their order."""
        waiting, self.waiting = self.waiting, {}
        for request in waiting.values():
            self.send(request, session)

    # ── releases of response slots ─────────────────────────────────────────────

    def _collect_releases(self, session: Session) -> list[int]:
        releases = self.releases
        out: list[int] = []
        while releases and len(out) < _MAX_RELEASES:
            generation, offset = releases.popleft()
            if generation == session.generation:
                out.append(offset)
        return out

    def flush_releases(self, session: Session | None) -> None:
        """Send the releases on their own when too many wait for a request to carry them."""
        if len(self.releases) > _MAX_RELEASES and session is not None and not session.lost:
            self._send(remote.Release(self._collect_releases(session)))

    # ── answers ────────────────────────────────────────────────────────────────

    def _answered(self, request_id: int) -> Request | None:
        request = self.pending.pop(request_id, None)
        if request is not None:
            self.free(request)
        return request

    def on_result(self, msg: remote.Result, frames: list[zmq.Frame]) -> None:
        request = self._answered(msg.id)
        session = request.session if request is not None else None
        if request is None or session is None or request.future.done():
            if session is not None:  # nobody will read these outputs: free their slots now
                self.releases.extend((session.generation, d.where) for d in msg.tensors if d.kind == remote.ARENA)
            return
        try:
            outputs = tensor_io.read(msg.tensors, msg.blobs, frames, lambda d: self._output_slot(session, d))
        except Exception as e:  # a reply we cannot rebuild fails its request, not the client
            request.future.set_exception(
                e if isinstance(e, ProtocolError) else ProtocolError(f"unreadable reply: {e!r}")
            )
            return
        request.future.set_result(dict(zip(msg.names, outputs)))

    def _output_slot(self, session: Session, d: TensorDesc) -> torch.Tensor:
        arena = session.response_arena
        if arena is None:
            raise ValueError("a shared-memory output, but this session has no shared memory")
        nbytes = d.nbytes
        dtype = DTYPES[d.dtype]
        if d.where + nbytes > arena.size or d.where % dtype.itemsize:
            raise ValueError(f"slot [{d.where}, {d.where + nbytes}) does not fit the {arena.size}-byte arena")
        tensor, owner = tensor_io.as_tensor(arena.bytes[d.where : d.where + nbytes], dtype, d.shape)
        # When the caller's last tensor over the slot dies, its offset goes back to the
        # server with the next request.
        weakref.finalize(owner, self.releases.append, (session.generation, d.where)).atexit = False
        return tensor

    def on_failure(self, msg: remote.Failure) -> None:
        if msg.id < 0:
            log.warning("the server at %s refused a message: %s: %s", self.endpoint, msg.error_type, msg.message)
            return
        request = self._answered(msg.id)
        if request is None or request.future.done():
            return
        if msg.error_type == "ProtocolError" and msg.message.startswith("no session"):
            # the server forgot us (it restarted): this request never ran
            error: BaseException = ServerConnectionError(
                f"the server at {self.endpoint} lost this client's session (did it restart?)", endpoint=self.endpoint
            )
        else:
            error = error_from_plain(msg.error_type, msg.message, msg.fields, msg.traceback)
        request.future.set_exception(error)

    def on_answer(self, msg: remote.Answer) -> None:
        request = self._answered(msg.id)
        if request is not None and not request.future.done():
            request.future.set_result(msg.data)

    # ── timers ─────────────────────────────────────────────────────────────────

    def next_due(self) -> float | None:
        """When the earliest live timer is due (None: none is)."""
        due = [when for when in (self._deadlines.next(), self._session_waits.next()) if when is not None]
        return min(due) if due else None

    def run_timers(self, now: float, no_session: Callable[[], BaseException]) -> None:
        """Expire the requests past their deadline; fail with ``no_session()`` those that
        waited too long for a session."""
        for request_id in self._deadlines.due(now):
            request = self.pending.get(request_id)
            if request is not None and not request.expired:
                self._expire(request)
        for request_id in self._session_waits.due(now):
            request = self.waiting.pop(request_id, None)
            if request is not None:
                self.fail(request, no_session())

    def _expire(self, request: Request) -> None:
        request.expired = True
        if not request.future.done():
            what = f"model {request.model!r}" if request.model else f"{request.what}()"
            request.future.set_exception(
                TimeoutError(f"{what}: no answer from the server at {self.endpoint} within {request.timeout} s")
            )
        self._send(remote.Cancel(request.id))

    # ── failures ───────────────────────────────────────────────────────────────

    def fail(self, request: Request, error: BaseException) -> None:
        self.free(request)
        if not request.future.done():
            request.future.set_exception(error)

    def fail_waiting(self, error: BaseException) -> None:
        waiting, self.waiting = self.waiting, {}
        for request in waiting.values():
            self.fail(request, error)

    def fail_lost(self, session: Session, error: BaseException) -> None:
        """Fail the requests in flight on a session that ended."""
        for request in [r for r in self.pending.values() if r.session is session]:
            del self.pending[request.id]
            self.fail(request, error)

    def fail_all(self, error: BaseException) -> None:
        """Fail every request, waiting or in flight (at shutdown)."""
        self.fail_waiting(error)
        pending, self.pending = self.pending, {}
        for request in pending.values():
            self.fail(request, error)

    def _send(self, msg: remote.Message) -> None:
        self.sock.send(remote.encode(msg))
