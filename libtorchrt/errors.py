"""The exception taxonomy of libtorchrt (runs in the front process).

Every error the library raises derives from :class:`TorchRTError`. The subclasses say
whose fault it was, so callers can react without parsing messages:

- the caller's input: :class:`UnknownModelError`, :class:`InvalidInputError` (and
  :class:`SequenceError`, a request of a sequence that is not running);
- the configuration: :class:`ConfigError`;
- the model itself raised: :class:`ModelError` (remote traceback text attached);
- something outside broke: :class:`WorkerDiedError`, :class:`WorkerStartError`,
  :class:`ModelUnavailableError`, :class:`ProtocolError`, and
  :class:`SequenceLostError` (the process holding a sequence's state died);
- a remote client's server could not be reached, or went away:
  :class:`ServerConnectionError`;
- the caller closed the pool: :class:`PoolClosedError`;
- a deadline passed: :class:`TimeoutError`.
"""

from __future__ import annotations

import builtins

__all__ = [
    "ConfigError",
    "InvalidInputError",
    "ModelError",
    "ModelUnavailableError",
    "PoolClosedError",
    "ProtocolError",
    "QueueFullError",
    "SequenceError",
    "SequenceLostError",
    "ServerConnectionError",
    "TimeoutError",
    "TorchRTError",
    "UnknownModelError",
    "WorkerDiedError",
    "WorkerStartError",
]


class TorchRTError(Exception):
    """Root of every error raised by libtorchrt."""


class ConfigError(TorchRTError, ValueError):
    """A model configuration is invalid (names the model, key and value)."""

    def __init__(self, message: str, *, model: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.model = model
        self.key = key


class UnknownModelError(TorchRTError, KeyError):
    """A request named a model that the pool does not serve."""

    def __init__(
        self, model: str, known: list[str], *, version: int | None = None, versions: list[int] | None = None
    ) -> None:
        self.model = model
        self.known = known
        self.version = version
        if version is not None and versions:
            text = f"model {model!r} has no version {version}; it serves versions {sorted(versions)}"
        else:
            text = f"unknown model {model!r}; this pool serves {sorted(known)}"
        super().__init__(text)

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class InvalidInputError(TorchRTError, ValueError):
    """A request's inputs do not match what the model expects.

    Attributes name the model and input and say what was expected and what was got.
    """

    def __init__(
        self,
        model: str,
        input: str | None,
        expected: str,
        got: str,
    ) -> None:
        self.model = model
        self.input = input
        self.expected = expected
        self.got = got
        where = f"input {input!r} of model {model!r}" if input else f"inputs of model {model!r}"
        super().__init__(f"{where}: expected {expected}, got {got}")


class ModelError(TorchRTError):
    """The model raised while executing a request; only that request failed.

    ``remote_traceback`` holds the worker's traceback text, also shown in ``str()``.
    """

    def __init__(self, model: str, error_type: str, message: str, remote_traceback: str) -> None:
        self.model = model
        self.error_type = error_type
        self.message = message
        self.remote_traceback = remote_traceback
        super().__init__(f"model {model!r} raised {error_type}: {message}")

    def __str__(self) -> str:
        if not self.remote_traceback:
            return str(self.args[0])
        # The traceback ends with the full message (TorchScript's includes its own
        # traceback), so the headline keeps only the message's last line.
        lines = [line for line in self.message.strip().splitlines() if line.strip()]
        headline = f"model {self.model!r} raised {self.error_type}: {lines[-1] if lines else ''}"
        return f"{headline}\n\nWorker traceback:\n{self.remote_traceback.rstrip()}"


class WorkerDiedError(TorchRTError):
    """The worker process serving a request exited before answering it."""

    def __init__(
        self,
        model: str,
        instance: int,
        pid: int,
        exitcode: int | None,
        stderr_tail: str = "",
        *,
        poison: bool = False,
    ) -> None:
        self.model = model
        self.instance = instance
        self.pid = pid
        self.exitcode = exitcode
        self.signal = -exitcode if exitcode is not None and exitcode < 0 else None
        self.stderr_tail = stderr_tail
        #: the request was running when two workers died: it is not sent a third time
        self.poison = poison
        how = f"was killed by signal {self.signal}" if self.signal is not None else f"exited with code {exitcode}"
        text = f"worker {instance} of model {model!r} (pid {pid}) {how}"
        if poison:
            text += "; this request was running in two workers that died, so it is not retried (a poison request?)"
        if stderr_tail:
            text += "; last lines of its stderr:\n" + stderr_tail.rstrip()
        super().__init__(text)


class SequenceError(InvalidInputError):
    """A request names a sequence that cannot take it: not started (or ended, or
    freed after idling), or its sequence flags do not fit the model.

    ``sequence_id`` names the sequence (None when the request named none).
    """

    def __init__(self, model: str, sequence_id: int | str | None, expected: str, got: str) -> None:
        self.sequence_id = sequence_id
        super().__init__(model, None, expected, got)
        if sequence_id is not None:
            self.args = (f"sequence {sequence_id!r} of model {model!r}: expected {expected}, got {got}",)


class SequenceLostError(WorkerDiedError):
    """The worker process holding a sequence died: its state is gone, so the sequence
    cannot go on (a retry elsewhere would run on fresh state). Its waiting and later
    requests fail with this until a request starts it again (``sequence_start``)."""

    def __init__(
        self, model: str, sequence_id: int | str, instance: int, pid: int, exitcode: int | None, reason: str = ""
    ) -> None:
        super().__init__(model, instance, pid, exitcode)
        self.sequence_id = sequence_id
        self.args = (
            f"sequence {sequence_id!r} of model {model!r} is lost: {reason or str(self)}; its state is gone, so "
            "its requests fail until one starts it again (sequence_start=True)",
        )


class ModelUnavailableError(TorchRTError):
    """The model cannot serve: every instance keeps failing to start (the pool keeps
    restarting them, with capped backoff, and serves the model again as soon as one is
    ready), or it failed to load when the pool started (``Pool.models()`` says why).
    Requests fail fast. ``reason`` is the last start-up error. Also the error of a
    request that ``Pool.unload``'s ``grace`` did not let finish (``unloaded``).
    """

    def __init__(self, model: str, reason: str, *, loaded: bool = True, unloaded: bool = False) -> None:
        self.model = model
        self.reason = reason
        if unloaded:
            text = f"model {model!r} is unavailable: {reason}"
        elif loaded:
            text = f"model {model!r} is unavailable: its workers keep failing to start; last error: {reason}"
        else:
            text = f"model {model!r} is unavailable: it failed to load: {reason}"
        super().__init__(text)


class QueueFullError(TorchRTError):
    """The request was refused at once: the model's queue (``max_queue_size``) or the
    pool's (``max_pending``) is full. Nothing was queued; try again later."""

    def __init__(self, model: str, limit: int, what: str = "max_queue_size") -> None:
        self.model = model
        self.limit = limit
        super().__init__(f"model {model!r}: the queue is full ({what}={limit}); the request was not taken")


class WorkerStartError(TorchRTError):
    """A worker process could not start (bad model file, bad flags, timeout)."""

    def __init__(self, model: str, instance: int, message: str, stderr_tail: str = "") -> None:
        self.model = model
        self.instance = instance
        self.stderr_tail = stderr_tail
        text = f"worker {instance} of model {model!r} failed to start: {message}"
        if stderr_tail:
            text += "\nlast lines of its stderr:\n" + stderr_tail.rstrip()
        super().__init__(text)


class ProtocolError(TorchRTError):
    """A message on the wire was malformed or of another protocol version."""


class ServerConnectionError(TorchRTError, ConnectionError):
    """A remote client (``libtorchrt.Client``) could not reach its server (no answer,
    a refused ZeroMQ handshake), or lost the connection before a request was answered.

    ``endpoint`` names the server.
    """

    def __init__(self, message: str, *, endpoint: str = "") -> None:
        super().__init__(message)
        self.endpoint = endpoint

    def __str__(self) -> str:  # OSError would format a single argument the same; be explicit
        return str(self.args[0]) if self.args else ""


class PoolClosedError(TorchRTError):
    """The pool was closed (by the caller) before or while serving the request."""


class TimeoutError(TorchRTError, builtins.TimeoutError):
    """A request did not complete within its timeout."""
