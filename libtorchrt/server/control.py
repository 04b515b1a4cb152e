"""Model control as tritonserver has it: the repository index, and models loaded and
unloaded while the server runs (server process: the protocols' worker threads, and the
repository's poller thread).

::

    --model-control-mode   at start                 while serving
    ────────────────────   ────────────────────     ─────────────────────────────────────
    none (the default)     every model              load and unload refused (Triton's answer)
    explicit               --load-model's (none;    load and unload by request: POST
                           '*': every model)        /v2/repository/models/{name}/load, ...
    poll                   every model              the poller thread looks at the repository
                                                    every --repository-poll-secs: a model
                                                    added is loaded, one removed unloaded,
                                                    one whose files changed loaded anew;
                                                    load and unload refused

Protocol-neutral: the HTTP application and the gRPC service call :class:`RepositoryControl`
and say its :class:`IndexEntry` list and its :class:`ControlError` in their protocols
(``ControlError.status`` is the HTTP status Triton answers with; gRPC maps it as the
other errors). A model loaded anew goes on serving until its new workers are ready
(``Pool.load``), so polling or loading drops no request.

What changed is told by each model directory's fingerprint: its files' paths, sizes and
modification times, and ``config.pbtxt``'s bytes, taken before the model is read (a
change made while it is read is seen at the next look). As in Triton, loading a model
whose directory did not change since it was loaded does nothing.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format, text_format

from ..config import model_config_pb2 as pb
from ..config.repository import load_model, model_names
from ..errors import ConfigError, PoolClosedError, TorchRTError, UnknownModelError
from ..front.pool import Pool

__all__ = [
    "DEFAULT_POLL_SECS",
    "MODES",
    "NOT_ALLOWED",
    "ControlError",
    "IndexEntry",
    "RepositoryControl",
    "index_json",
]

log = logging.getLogger("libtorchrt.server")

#: ``--model-control-mode``'s values
MODES = ("none", "explicit", "poll")
#: ``--repository-poll-secs``'s default (tritonserver's)
DEFAULT_POLL_SECS = 15.0
#: tritonserver's answer to a load or unload in a mode that does not take them (it
#: says "polling" in mode none too); HTTP 503, gRPC UNAVAILABLE
NOT_ALLOWED = "explicit model load / unload is not allowed if polling is enabled"
#: how each state of ``Pool.models()`` shows in the index (Triton's ModelReadyState)
_STATES = {
    "ready": "READY",
    "loading": "LOADING",
    "unloading": "UNLOADING",
    "unavailable": "UNAVAILABLE",
    "failed": "UNAVAILABLE",
    "stopped": "UNAVAILABLE",
}
#: the reason an unloaded model's versions give (Triton's)
_UNLOADED = "unloaded"

#: a model directory's files (path, size, mtime) and the hash of its configuration
Fingerprint = tuple[str, tuple[tuple[str, int, int], ...]]


class ControlError(Exception):
    """A load, unload or index request refused or failed.

    Attributes:
        status: the HTTP status tritonserver answers with (400 a load that failed, 500
            a model the repository does not have, 503 a mode that takes no load or
            unload); gRPC says it with the same mapping as the other errors.
        message: one line, for the client.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class IndexEntry:
    """One line of the repository index: a model version and its state.

    ``state`` is Triton's (``READY``, ``LOADING``, ``UNLOADING``, ``UNAVAILABLE``), and
    None with ``version`` None for a model of the repository never loaded.
    """

    name: str
    version: int | None = None
    state: str | None = None
    reason: str = ""


def index_json(entries: Sequence[IndexEntry]) -> list[dict[str, str]]:
    """The index as Triton's HTTP API writes it (``version`` and ``state`` only where known)."""
    out = []
    for e in entries:
        doc = {"name": e.name}
        if e.state is not None:
            doc["state"] = e.state
            if e.version is not None:
                doc["version"] = str(e.version)
            doc["reason"] = e.reason
        out.append(doc)
    return out


def fingerprint(directory: Path) -> Fingerprint:
    """What changes when a model directory's content does (see the module docstring)."""
    files = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except OSError:  # (removed meanwhile: the next look sees it gone)
                continue
            files.append((os.path.relpath(path, directory), st.st_size, st.st_mtime_ns))
    try:
        config = hashlib.sha256((directory / "config.pbtxt").read_bytes()).hexdigest()
    except OSError:
        config = ""
    return config, tuple(files)


def config_text(name: str, parameters: Mapping[str, object]) -> str | None:
    """The ``config.pbtxt`` text a load request's ``config`` parameter gives (None: none).

    The parameter is the model's configuration as JSON, in the form
    ``GET /v2/models/{name}/config`` answers (Triton's). Model files given with the
    request (``file:`` parameters) are not supported.

    Raises:
        ControlError: 400, a parameter that is not understood or a configuration that
            does not parse.
    """
    text = None
    for key, value in parameters.items():
        if key == "config" and isinstance(value, str):
            try:
                msg = json_format.Parse(value, pb.ModelConfig())
            except (json_format.ParseError, ValueError) as e:
                raise ControlError(400, f"Invalid config override: {_one_line(str(e))}") from None
            text = text_format.MessageToString(msg)
        elif key.startswith("file:"):
            raise ControlError(
                400,
                f"load parameter {key!r}: model files given with the request are not supported; put them in the "
                "model repository",
            )
        else:
            kind = {bool: "BOOL", int: "INT64", str: "STRING", bytes: "BYTES"}.get(type(value), type(value).__name__)
            raise ControlError(400, f"Unrecognized load parameter '{key}' with type '{kind}'")
    return text  # (a name other than the model's is refused as config.pbtxt's would be)


def _one_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


class RepositoryControl:
    """The repository index, and loads and unloads of its models while the server runs.

    Args:
        repository: the model repository.
        mode: ``none``, ``explicit`` or ``poll`` (see the module docstring).
        poll_secs: seconds between two looks at the repository (mode poll; 0: never).
        load_models: mode explicit: the models loaded at start (``"*"``: all).
    """

    def __init__(
        self,
        repository: str | os.PathLike[str],
        mode: str = "none",
        poll_secs: float = DEFAULT_POLL_SECS,
        load_models: Sequence[str] = (),
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"model control mode {mode!r}; expected one of {list(MODES)}")
        self.repository = Path(repository)
        self.mode = mode
        self.poll_secs = poll_secs
        self.load_models = list(load_models)
        self.pool: Pool | None = None
        #: one change at a time (a request's, or the poller's)
        self._lock = threading.Lock()
        #: each model's directory as it was when it was last loaded (or tried, by the
        #: poller: a failed load is tried again once its files change)
        self._seen: dict[str, Fingerprint] = {}
        #: why a model that is not served failed to load (its configuration, before the pool)
        self._errors: dict[str, str] = {}
        #: models unloaded, and the versions they served
        self._unloaded: dict[str, list[int | None]] = {}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # ── the server's start and end ─────────────────────────────────────────────

    def startup_models(self) -> list[str] | None:
        """The models the pool loads at start (None: every one; ``Pool(load_models=)``),
        their directories' fingerprints taken now, before they are read."""
        names = model_names(self.repository) if self.repository.is_dir() else []
        chosen: list[str] | None
        if self.mode == "explicit":
            chosen = names if "*" in self.load_models else list(dict.fromkeys(self.load_models))
        elif self.mode == "poll":
            chosen = names  # (an empty repository is served: models may come)
        else:
            chosen = None
        for name in names if chosen is None else chosen:
            self._seen[name] = fingerprint(self.repository / name)
        return chosen

    def start(self, pool: Pool) -> None:
        """Serve ``pool``'s models; in mode poll, start looking at the repository."""
        self.pool = pool
        if self.mode == "poll" and self.poll_secs > 0:
            self._poller = threading.Thread(target=self._poll_loop, name="libtorchrt-repository-poll", daemon=True)
            self._poller.start()

    def stop(self) -> None:
        """Look at the repository no more (from any thread; a load under way goes on
        until the pool closes)."""
        self._stop.set()

    def join(self, timeout: float) -> None:
        """Wait for the poller thread to end (after :meth:`stop`, and the pool closed)."""
        if self._poller is not None:
            self._poller.join(timeout)
            if self._poller.is_alive():
                log.warning("the repository's poller did not stop within %.0f s", timeout)

    # ── the protocols' requests ────────────────────────────────────────────────

    def index(self, ready: bool = False) -> list[IndexEntry]:
        """Every model of the repository, and every model version served, with its state
        (``ready``: only the versions ready). Reads the repository directory."""
        pool = self._pool()
        by_name: dict[str, list[IndexEntry]] = collections.defaultdict(list)
        for s in pool.models():
            by_name[s.name].append(IndexEntry(s.name, s.version, _STATES.get(s.state, "UNAVAILABLE"), s.error or ""))
        try:
            present = model_names(self.repository)
        except ConfigError:  # (the directory is gone)
            present = []
        out: list[IndexEntry] = []
        for name in sorted({*present, *by_name, *self._errors, *self._unloaded}):
            if name in by_name:
                out += by_name[name]
            elif name in self._errors:
                out.append(IndexEntry(name, None, "UNAVAILABLE", self._errors[name]))
            elif name in self._unloaded:
                out += [IndexEntry(name, v, "UNAVAILABLE", _UNLOADED) for v in self._unloaded[name]]
            else:
                out.append(IndexEntry(name))
        return [e for e in out if e.state == "READY"] if ready else out

    def load(self, name: str, parameters: Mapping[str, object] | None = None) -> None:
        """Load model ``name`` of the repository, or load it anew (mode explicit).

        Returns once it serves (a model loaded anew serves meanwhile as before);
        does nothing if its directory did not change since it was loaded.

        Raises:
            ControlError: not mode explicit (503, tritonserver's message); a parameter
                not understood or a configuration that does not parse (400); no such
                model (500, as tritonserver); it failed to load (400, why).
        """
        self._allowed()
        config = config_text(name, parameters or {})
        pool = self._pool()
        with self._lock:
            self._load(pool, name, config, quiet_if_unchanged=True)

    def unload(self, name: str) -> None:
        """Unload model ``name`` (mode explicit): its requests in flight finish first.

        Unloading a model that is not loaded does nothing, as in tritonserver.

        Raises:
            ControlError: not mode explicit (503, tritonserver's message).
        """
        self._allowed()
        pool = self._pool()
        with self._lock:
            self._unload(pool, name)

    # ── what they share ────────────────────────────────────────────────────────

    def _allowed(self) -> None:
        if self.mode != "explicit":
            raise ControlError(503, NOT_ALLOWED)

    def _pool(self) -> Pool:
        pool = self.pool
        if pool is None:
            raise ControlError(503, "the server is loading its models; retry when /v2/health/ready answers 200")
        return pool

    def _load(self, pool: Pool, name: str, config: str | None, quiet_if_unchanged: bool) -> None:
        directory = self.repository / name
        if "/" in name or name in ("", ".", "..") or not (directory / "config.pbtxt").is_file():
            raise ControlError(
                500,
                f"failed to load '{name}', failed to poll from model repository: {str(self.repository)!r} has no "
                f"{name}/config.pbtxt",
            )
        seen = fingerprint(directory)
        served = any(s.name == name and s.state != "failed" and s.version is not None for s in pool.models())
        if quiet_if_unchanged and config is None and served and self._seen.get(name) == seen:
            log.info("model %s is loaded and its files did not change: not loaded again", name)
            return
        try:
            configs = load_model(self.repository, name, config)
            pool.load(configs)
        except PoolClosedError as e:
            raise ControlError(503, f"failed to load '{name}': {_one_line(str(e))}") from None
        except (TorchRTError, ValueError) as e:
            if not served:
                self._errors[name] = _one_line(str(e))
            raise ControlError(400, f"load failed for model '{name}': {_one_line(str(e))}") from None
        # (a configuration given with the request: loading from the files undoes it)
        self._seen[name] = seen if config is None else ("", ())
        self._errors.pop(name, None)
        self._unloaded.pop(name, None)

    def _unload(self, pool: Pool, name: str) -> None:
        versions = [s.version for s in pool.models() if s.name == name and s.state != "failed"]
        try:
            pool.unload(name)
        except UnknownModelError:
            pass
        if versions:  # (a model that was not served stays as it was in the index)
            self._unloaded[name] = versions
        self._errors.pop(name, None)
        self._seen.pop(name, None)

    # ── mode poll ──────────────────────────────────────────────────────────────

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_secs):
            try:
                self.poll()
            except Exception:  # (one look failed; the next may not)
                if not self._stop.is_set():
                    log.exception("looking at the model repository %s failed", self.repository)

    def poll(self) -> None:
        """Look at the repository once and apply what changed: a model added is loaded,
        one removed is unloaded, one whose files changed is loaded anew (a failure is
        logged; the model is served as before)."""
        pool = self._pool()
        with self._lock:
            try:
                present = model_names(self.repository)
            except ConfigError as e:
                log.error("cannot look at the model repository: %s", e)
                return
            for name in sorted(set(self._seen) - set(present)):
                if self._stop.is_set():
                    return
                log.info("model %s left the repository %s: unloading it", name, self.repository)
                self._unload(pool, name)
                self._unloaded.pop(name, None)  # (it is not in the repository: not listed)
            for name in present:
                if self._stop.is_set():
                    return
                seen = fingerprint(self.repository / name)
                if self._seen.get(name) == seen:
                    continue
                log.info("model %s %s: loading it", name, "changed" if name in self._seen else "appeared")
                try:
                    self._load(pool, name, None, quiet_if_unchanged=False)
                except ControlError as e:
                    if not self._stop.is_set():
                        log.error("%s", e.message)
                self._seen[name] = seen  # (tried once per change of its files)
