"""The ZeroMQ frontend's requests: read, sent to the pool, answered (server process, I/O thread).

::

    ROUTER ─► read frame by frame, bounded ─► HELLO: a session (Sessions), WELCOME
                                             INFER: tensors viewed in place ─► pool.submit()
                                             QUERY: pool.models() / pool.health()  │
    ROUTER ◄─ RESULT (outputs copied into the session's response    ◄── completions ◄─ future done
              arena, or zero-copy frames) / FAILURE / ANSWER            (Inbox, any thread)

A hostile peer is bounded before anything is allocated for it: libzmq refuses a frame
above ``max_request_bytes`` (see :mod:`.zmq_endpoint`), and each message is read frame
by frame, refusing one of more frames than a request can use or more bytes in all than
the limit allows (releasing each frame as it is read) before anything is decoded; a
header's timeout, sizes and fields are checked by ``remote``. One bad message gets an
error answer (or is logged), never takes the frontend down.

A pool future may finish in any thread (the pool's router, or this one): its
completion goes through an :class:`~..transport.loop.Inbox` that the I/O thread
drains, and only that thread touches the sockets.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
import zmq

from .. import __version__
from .._plain import error_to_plain, health_to_plain, statuses_to_plain
from ..errors import InvalidInputError, PoolClosedError, ProtocolError
from ..transport import remote
from ..transport import tensors as tensor_io
from ..transport.loop import Inbox
from ..transport.sockets import Bounded, recv_bounded, send
from ..transport.wire import FRAME
from .zmq_endpoint import HEADER_MARGIN, Endpoint
from .zmq_handoff import Handoff
from .zmq_sessions import Session, Sessions

__all__ = ["Completion", "Requests"]

log = logging.getLogger("libtorchrt.server")

#: Messages handled per wake-up before the other sources get a turn.
_BATCH = 256

#: A pool future that finished: (its session, the client's request id, the future).
Completion = tuple[Session, int, "Future[Any]"]


class Requests:
    """Clients' messages handled, and the pool's answers sent back (I/O thread only,
    but for the pool's done-callbacks, which only put into ``completions``).

    Args:
        pool: what serves the requests (``submit``, ``models``, ``health``).
        endpoint: the bound ROUTER, with ``max_request_bytes``.
        sessions: the live sessions.
        handoff: the shared-memory hand-off, or None (not offered).
        completions: where finished pool futures wait for this thread.
        closing: whether the frontend is closing (new requests are refused).
        inline_threshold: outputs up to this many bytes travel inside the header.
    """

    def __init__(
        self,
        pool: Any,
        endpoint: Endpoint,
        sessions: Sessions,
        handoff: Handoff | None,
        completions: Inbox[Completion],
        closing: Callable[[], bool],
        inline_threshold: int,
    ) -> None:
        self.pool = pool
        self._endpoint = endpoint
        self._sessions = sessions
        self._handoff = handoff
        self.completions = completions
        self._closing = closing
        self._inline_threshold = inline_threshold
        self._boot_id = remote.boot_id()

    def on_messages(self) -> None:
        sock = self._endpoint.sock
        assert sock is not None
        limit = self._endpoint.max_request_bytes
        max_bytes = None if limit is None else limit + HEADER_MARGIN
        for _ in range(_BATCH):
            try:
                message = recv_bounded(sock, remote.MAX_FRAMES, max_bytes)
            except zmq.Again:
                return
            identity, parts = message.identity, message.frames
            try:
                if message.refused:
                    self._refuse(message)
                elif parts:
                    self._on_message(identity, parts[0], parts[1:])
            except Exception:  # one bad message must not take the frontend down
                log.exception("failed to handle a message from client %s", identity.hex())

    def _refuse(self, message: Bounded) -> None:
        """A message over the bounds of :meth:`on_messages` (already released): answer
        its request, named by its header if that could be kept, with an error: too many
        frames is a ProtocolError, too many bytes for an INFER an InvalidInputError."""
        identity, why = message.identity, message.refused
        header = message.frames[0] if message.frames else None
        log.warning("refused %s from client %s", why, identity.hex())
        request_id = remote.request_id(header.bytes) if header is not None else -1
        limit = self._endpoint.max_request_bytes
        error: Exception = ProtocolError(f"message refused: {why}")
        if message.count <= remote.MAX_FRAMES and limit is not None and header is not None and request_id >= 0:
            try:
                msg = remote.decode(header.bytes)
            except ProtocolError:
                pass
            else:
                if isinstance(msg, remote.Infer):
                    error = InvalidInputError(msg.model, None, f"at most max_request_bytes={limit} bytes", why)
        self.reply_error(identity, request_id, error)

    def _on_message(self, identity: bytes, first: zmq.Frame, frames: list[zmq.Frame]) -> None:
        header = first.bytes
        try:
            kind, protocol = remote.peek_protocol(header)
        except ProtocolError as e:
            self.reply_error(identity, -1, e)
            return
        if kind == remote.Hello.KIND:
            self._on_hello(identity, header, protocol, first)
            return
        session = self._sessions.get(identity)
        try:
            msg = remote.decode(header)
        except ProtocolError as e:
            # (answered as the request it names, if it names one: its caller fails now)
            self.reply_error(identity, remote.request_id(header), e)
            return
        if session is None:
            if isinstance(msg, (remote.Infer, remote.Query)):
                self.reply_error(
                    identity,
                    msg.id,
                    ProtocolError("no session: a client says HELLO first (did the server restart?)"),
                )
            return
        if isinstance(msg, remote.Infer):
            self._on_infer(session, msg, frames)
        elif isinstance(msg, remote.Query):
            self._on_query(session, msg)
        elif isinstance(msg, remote.Release):
            session.release(msg.offsets)
        elif isinstance(msg, remote.Cancel):
            future = session.pending.get(msg.id)
            if future is not None:
                future.cancel()  # only while queued in the pool; its reply follows
        elif isinstance(msg, remote.Bye):
            self._sessions.end(session)
        else:
            self.reply_error(identity, -1, ProtocolError(f"unexpected {type(msg).__name__} message"))

    def _on_hello(self, identity: bytes, header: bytes, protocol: int | None, frame: zmq.Frame) -> None:
        if protocol != remote.PROTOCOL_VERSION:
            log.warning(
                "refused a client speaking protocol %s (this server speaks %d)", protocol, remote.PROTOCOL_VERSION
            )
            self._send(identity, remote.Welcome(remote.PROTOCOL_VERSION, b"", "", 0, __version__))
            return
        try:
            hello = remote.decode(header)
        except ProtocolError as e:
            self.reply_error(identity, -1, e)
            return
        assert isinstance(hello, remote.Hello)
        old = self._sessions.get(identity)
        if old is not None:
            self._sessions.end(old)
        try:
            fd = int(frame.get(zmq.SRCFD))
        except (zmq.ZMQError, AttributeError, ValueError):
            fd = -1
        # Disconnections of earlier connections that used this descriptor were queued
        # before this connection existed: handle them before recording the new one.
        self._sessions.disconnected(self._endpoint.disconnections())
        session = self._sessions.begin(identity, fd)
        shm_path = ""
        if self._handoff is not None and hello.shared_memory and hello.boot_id and hello.boot_id == self._boot_id:
            shm_path = self._handoff.path
        welcome = remote.Welcome(
            remote.PROTOCOL_VERSION, session.token, shm_path, self._endpoint.max_request_bytes or 0, __version__
        )
        self._send(identity, welcome)

    def _on_infer(self, session: Session, msg: remote.Infer, frames: list[zmq.Frame]) -> None:
        if msg.releases:
            session.release(msg.releases)
        if self._closing():
            self.reply_error(session.identity, msg.id, PoolClosedError("the server is closing"))
            return
        if msg.id in session.pending:
            self.reply_error(session.identity, msg.id, ProtocolError(f"request id {msg.id} is already in flight"))
            return
        referenced = sum(1 for d in msg.tensors if d.kind == FRAME)
        if len(frames) > referenced:
            extra = ProtocolError(f"{len(frames)} data frames, but the header refers to {referenced}")
            self.reply_error(session.identity, msg.id, extra)
            return
        limit = self._endpoint.max_request_bytes
        if limit is not None:
            total = remote.payload_bytes(msg.tensors, msg.blobs)
            if total > limit:
                error = InvalidInputError(msg.model, None, f"at most max_request_bytes={limit} bytes", f"{total} bytes")
                self.reply_error(session.identity, msg.id, error)
                return
        try:
            values = tensor_io.read(msg.tensors, msg.blobs, frames, session.input_slot)
        except ProtocolError as e:
            self.reply_error(session.identity, msg.id, e)
            return
        inputs: Any = values[0] if msg.single else dict(zip(msg.names, values)) if msg.names is not None else values
        try:
            options: dict[str, Any] = {}
            if msg.priority is not None:  # (a pool without priorities takes no such argument)
                options["priority"] = msg.priority
            if msg.sequence_id is not None or msg.sequence_start or msg.sequence_end:
                options.update(
                    sequence_id=msg.sequence_id, sequence_start=msg.sequence_start, sequence_end=msg.sequence_end
                )
            future = self.pool.submit(msg.model, inputs, version=msg.version, timeout=msg.timeout, **options)
        except Exception as e:
            self.reply_error(session.identity, msg.id, e)
            return
        session.pending[msg.id] = future
        future.add_done_callback(functools.partial(self._done, session, msg.id))

    def _done(self, session: Session, request_id: int, future: Future[Any]) -> None:
        """A pool future finished (in the pool's router thread, or here)."""
        # Refused once the frontend closed: nobody will read it, so it is not kept.
        self.completions.put((session, request_id, future))

    def on_completions(self) -> None:
        """Answer the requests whose pool future finished."""
        completions = self.completions.items  # (popped one at a time, see Inbox)
        while completions:
            session, request_id, future = completions.popleft()
            if self._sessions.get(session.identity) is not session:
                continue  # the client went away: its outputs are dropped here
            session.pending.pop(request_id, None)
            if future.cancelled():
                self._send(session.identity, remote.Failure(request_id, "CancelledError", "cancelled"))
                continue
            exc = future.exception()
            if exc is not None:
                self.reply_error(session.identity, request_id, exc)
                continue
            try:
                self._reply_result(session, request_id, future.result())
            except Exception as e:  # e.g. an output dtype that cannot cross the wire
                self.reply_error(session.identity, request_id, e)

    def _reply_result(self, session: Session, request_id: int, outputs: dict[str, Any]) -> None:
        names = list(outputs)
        values: list[Any] = []
        for value in outputs.values():
            if isinstance(value, torch.Tensor):
                values.append(value if not value.is_cuda else value.cpu())
            elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                values.append(tensor_io.Strings.of(value))
            elif isinstance(value, np.ndarray):
                values.append(torch.from_numpy(value))
            else:
                raise ProtocolError(f"output {len(values)} is a {type(value).__name__}, which cannot be sent")
        placed = tensor_io.write(values, session.response_arena, session.response_allocator, self._inline_threshold)
        header = remote.encode(remote.Result(request_id, names, placed.descs, placed.blobs))
        assert self._endpoint.sock is not None
        # Zero-copy: the frames are the outputs' own memory, kept alive until sent.
        send(self._endpoint.sock, header, placed.frames, identity=session.identity, zero_copy=True)

    def _on_query(self, session: Session, msg: remote.Query) -> None:
        try:
            if msg.what == "models":
                data: Any = statuses_to_plain(self.pool.models())
            else:
                data = health_to_plain(self.pool.health())
        except Exception as e:
            self.reply_error(session.identity, msg.id, e)
            return
        self._send(session.identity, remote.Answer(msg.id, data))

    def reply_error(self, identity: bytes, request_id: int, exc: BaseException) -> None:
        error_type, message, fields, tb = error_to_plain(exc)
        self._send(identity, remote.Failure(request_id, error_type, message, fields, tb))

    def _send(self, identity: bytes, msg: remote.Message) -> None:
        assert self._endpoint.sock is not None
        self._endpoint.sock.send_multipart([identity, remote.encode(msg)])

    def end_all(self, why: str) -> None:
        """Answer every request still in the pool with PoolClosedError(``why``) and end
        every session (at shutdown)."""
        self.on_completions()
        for session in self._sessions:
            for request_id in list(session.pending):
                self.reply_error(session.identity, request_id, PoolClosedError(why))
            self._sessions.end(session)
