"""System shared memory: the regions clients register, and their bytes (server process).

Triton's system shared-memory extension. A client on this host creates a POSIX
shared-memory object (``shm_open("/key")``, as
``tritonclient.utils.shared_memory.create_shared_memory_region`` does), registers a
window of it under a name, and then names that region in its requests instead of
sending tensor bytes: inputs are read from it, outputs written into it. This module is
protocol-neutral: the HTTP endpoints (``http.py``) and the gRPC service call the same
:class:`Regions`, from any thread.

::

    client process                     server process (event loop or worker threads)
    ──────────────                     ─────────────────────────────────────────────
    shm_open("/key"), ftruncate,
    mmap; write the inputs
    register(name, key, offset, size) ──► Regions.register: open /dev/shm/key (O_RDWR,
                                          O_NOFOLLOW), fstat: a regular file holding
                                          offset + size bytes; keep the descriptor
    infer(an input in "name" at o, n) ──► Regions.read: fstat again (removed? shrunk? an
                                          error), pread n bytes at offset + o; the pool
                                          copies them into its request arena
                                      ◄── Regions.write: fstat, pwrite an output there
    read the outputs in its mapping
    unregister(name)                  ──► the descriptor is closed once no request uses it
    (shutdown)                        ──► Regions.close(): every region unregistered

**Descriptors, not mappings.** A region is read with ``pread`` and written with
``pwrite`` on a descriptor kept from registration, never through a mapping of the
client's object: a client that truncates its object while a request reads a mapping of
it would kill the server with SIGBUS, which Python cannot survive; ``pread`` merely
comes back short, and the request fails with an error that says so. It costs one copy
of each input (the pool copies it into its arena anyway) and maps nothing, so regions
hold no memory of the server's: what bounds them is their number (a descriptor each,
``max_regions``). The object is never unlinked here: it is the client's.

**Ownership.** Every call names an ``owner``, an opaque string; a region is seen (status,
unregister, use) only by the owner that registered it, and names are per owner. Over
HTTP there is at most one bearer token, so every HTTP client is one owner:
:func:`owner_for_token` of the server's token (``"anonymous"`` without one). A protocol
whose clients authenticate apart (a token per gRPC client) may key owners finer; one
that uses the same server token gets the same owner, so that a region registered over
HTTP serves gRPC requests too, as in Triton.

API (all methods thread-safe)::

    regions = Regions(max_regions=256)
    regions.register(name, key, offset, byte_size, owner)     # -> RegionStatus
    regions.status(name or None, owner)                       # -> [RegionStatus]
    regions.unregister(name or None, owner)                   # -> [names unregistered]
    regions.read(name, offset, byte_size, owner)              # -> bytearray (a copy)
    regions.write(name, offset, byte_size, data, owner)       # data: bytes-like
    regions.close()                                           # on shutdown; idempotent
    ShmRef.from_parameters(params, "input 'x'")               # a tensor's shared_memory_* parameters

Errors are :class:`SharedMemoryError`, whose ``code`` (Triton's error codes) says
whose fault it was; ``http_status`` maps it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import stat
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_REGIONS",
    "RegionStatus",
    "Regions",
    "SharedMemoryError",
    "ShmRef",
    "is_local_peer",
    "owner_for_token",
]

#: regions registered at once, all owners together (each holds a file descriptor)
MAX_REGIONS = 256
#: the longest region name taken (names travel in URLs and error messages)
MAX_NAME = 256
#: where glibc's shm_open keeps its objects
SHM_DIR = "/dev/shm"
#: the most bytes one region may span (the wire formats' sizes are int64)
_MAX_BYTES = 1 << 62

#: HTTP status of each error code
_HTTP = {
    "INVALID_ARG": 400,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 400,
    "UNAVAILABLE": 503,
}


class SharedMemoryError(Exception):
    """A shared-memory call the server refuses.

    Attributes:
        code: ``INVALID_ARG`` (a bad key, offset or size; a region its client removed or
            shrank), ``NOT_FOUND`` (no such region for this owner), ``ALREADY_EXISTS``
            (the name is taken), ``RESOURCE_EXHAUSTED`` (``max_regions`` reached) or
            ``UNAVAILABLE`` (the registry is closed: the server is stopping).
        message: one line, naming the region.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        """The HTTP status answering it."""
        return _HTTP.get(self.code, 500)


@dataclass(frozen=True)
class RegionStatus:
    """One registered region, as the status endpoints report it."""

    name: str
    key: str
    offset: int
    byte_size: int

    def to_json(self) -> dict[str, Any]:
        """Triton's status entry: ``{"name", "key", "offset", "byte_size"}``."""
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


def _size(value: Any, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= _MAX_BYTES:
        raise SharedMemoryError("INVALID_ARG", f"{what} must be an integer >= {minimum}, got {repr(value)[:40]}")
    return value


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME or not value.isprintable():
        raise SharedMemoryError(
            "INVALID_ARG",
            f"a shared memory region's name must be 1 to {MAX_NAME} printable characters, got {str(value)[:60]!r}",
        )
    return value


@dataclass(frozen=True)
class ShmRef:
    """Where a tensor lies in a region: a request's ``shared_memory_region``,
    ``shared_memory_offset`` and ``shared_memory_byte_size`` parameters."""

    region: str
    byte_size: int
    offset: int = 0

    @classmethod
    def from_parameters(cls, params: Mapping[str, Any], what: str) -> ShmRef | None:
        """The reference in a tensor's parameters (JSON values: a string, integers);
        None when it names no region.

        Raises:
            SharedMemoryError: ``INVALID_ARG``: a size without a region, a region without
                a size, a value of the wrong type (names ``what``).
        """
        region = params.get("shared_memory_region")
        if region is None:
            extra = [k for k in ("shared_memory_byte_size", "shared_memory_offset") if k in params]
            if extra:
                raise SharedMemoryError("INVALID_ARG", f"{what}: parameter {extra[0]!r} needs 'shared_memory_region'")
            return None
        try:
            region = _name(region)
            if "shared_memory_byte_size" not in params:
                raise SharedMemoryError("INVALID_ARG", "parameter 'shared_memory_byte_size' is missing")
            size = _size(params["shared_memory_byte_size"], "parameter 'shared_memory_byte_size'")
            offset = _size(params.get("shared_memory_offset", 0), "parameter 'shared_memory_offset'")
        except SharedMemoryError as e:
            raise SharedMemoryError(e.code, f"{what}: {e.message}") from None
        return cls(region, size, offset)


def owner_for_token(token: bytes | None) -> str:
    """The owner of the regions registered with bearer token ``token`` (None: no token
    configured, one shared owner). The token itself is never kept, only a digest."""
    if token is None:
        return "anonymous"
    return "token:" + hashlib.sha256(token).hexdigest()[:32]


def is_local_peer(host: str | None) -> bool:
    """Whether a client at ``host`` (its IP address, as the transport reports it; None
    for a Unix socket) runs on this host, so could share memory with the server: a
    loopback address, or none."""
    if host is None or host in ("", "unix"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _file_name(key: Any) -> str:
    """The file of ``shm_open(key)`` in :data:`SHM_DIR`: glibc drops the leading slashes,
    and a name with another slash is not a shared-memory object.

    Raises:
        SharedMemoryError: ``INVALID_ARG``.
    """
    name = key.lstrip("/") if isinstance(key, str) else ""
    if not name or "/" in name or name in (".", "..") or "\0" in name or len(name.encode()) > 255:
        raise SharedMemoryError(
            "INVALID_ARG",
            f"shared memory key {str(key)[:80]!r} is not a POSIX shared memory name "
            "(expected '/name', as given to shm_open: no other '/', at most 255 bytes)",
        )
    return name


class _Region:
    """A registered region: the client's object, held by a descriptor."""

    def __init__(self, owner: str, status: RegionStatus, fd: int) -> None:
        self.owner = owner
        self.status = status
        self.fd = fd
        #: requests reading or writing it now (the descriptor outlives them)
        self.users = 0
        #: unregistered while in use: the last user closes the descriptor
        self.gone = False


class Regions:
    """The registered system shared-memory regions (one registry per server).

    Args:
        max_regions: the most regions registered at once, all owners together.
        directory: where shared-memory objects live (glibc's ``/dev/shm``).
    """

    def __init__(self, max_regions: int = MAX_REGIONS, directory: str = SHM_DIR) -> None:
        self.max_regions = max_regions
        self.directory = directory
        self._lock = threading.Lock()
        #: (owner, name) -> region; guarded by _lock
        self._regions: dict[tuple[str, str], _Region] = {}
        self._closed = False

    def __enter__(self) -> Regions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._regions)

    # ── registration ───────────────────────────────────────────────────────

    def register(self, name: str, key: str, offset: int, byte_size: int, owner: str) -> RegionStatus:
        """Register ``byte_size`` bytes at ``offset`` of the object ``key`` as ``name``.

        Raises:
            SharedMemoryError: ``ALREADY_EXISTS`` (the owner has a region of that name;
                unregister it first), ``INVALID_ARG`` (a malformed key, no such object,
                one that cannot be opened for reading and writing, not a regular file,
                or smaller than ``offset + byte_size``), ``RESOURCE_EXHAUSTED``
                (``max_regions``), ``UNAVAILABLE`` (closed).
        """
        name = _name(name)
        file = _file_name(key)
        offset = _size(offset, f"region {name!r}: offset")
        byte_size = _size(byte_size, f"region {name!r}: byte_size", 1)
        with self._lock:  # cheap checks first: a refused call opens nothing
            self._check_room(name, owner)
        fail = f"cannot register shared memory region {name!r}"
        try:
            fd = os.open(os.path.join(self.directory, file), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            hint = " (the client must create it first, e.g. shm_open or create_shared_memory_region)"
            raise SharedMemoryError(
                "INVALID_ARG", f"{fail}: key {key!r}: {e.strerror}{hint if e.errno == 2 else ''}"
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SharedMemoryError("INVALID_ARG", f"{fail}: key {key!r} is not a shared memory object")
            if offset + byte_size > st.st_size:
                raise SharedMemoryError(
                    "INVALID_ARG",
                    f"{fail}: offset {offset} + byte_size {byte_size} is past the end of {key!r} ({st.st_size} bytes)",
                )
            status = RegionStatus(name, key, offset, byte_size)
            with self._lock:
                self._check_room(name, owner)  # (again: another thread may have registered meanwhile)
                self._regions[(owner, name)] = _Region(owner, status, fd)
        except BaseException:
            os.close(fd)
            raise
        return status

    def _check_room(self, name: str, owner: str) -> None:
        if self._closed:
            raise SharedMemoryError("UNAVAILABLE", "the server is shutting down: no shared memory can be registered")
        if (owner, name) in self._regions:
            raise SharedMemoryError(
                "ALREADY_EXISTS", f"shared memory region {name!r} is already registered; unregister it first"
            )
        if len(self._regions) >= self.max_regions:
            raise SharedMemoryError(
                "RESOURCE_EXHAUSTED",
                f"{self.max_regions} shared memory regions are registered already, the most this server holds; "
                "unregister some first",
            )

    def unregister(self, name: str | None, owner: str) -> list[str]:
        """Unregister the owner's region ``name`` (None: all of the owner's). A name that
        is not registered is no error (as in Triton). A region in use by a request is
        closed when the request is done with it; its name is free at once.

        Returns:
            The names unregistered.
        """
        with self._lock:
            keys = [k for k in self._regions if k[0] == owner and (name is None or k[1] == name)]
            regions = [self._regions.pop(k) for k in keys]
            for region in regions:
                region.gone = True
                if not region.users:
                    os.close(region.fd)
        return [k[1] for k in keys]

    def status(self, name: str | None, owner: str) -> list[RegionStatus]:
        """The owner's region ``name``, or all of them (None), by name.

        Raises:
            SharedMemoryError: ``NOT_FOUND``: the owner has no region ``name``.
        """
        with self._lock:
            if name is None:
                return sorted((r.status for (o, _), r in self._regions.items() if o == owner), key=lambda s: s.name)
            region = self._regions.get((owner, name))
        if region is None:
            raise SharedMemoryError("NOT_FOUND", f"no system shared memory region {name!r} is registered")
        return [region.status]

    def close(self) -> None:
        """Unregister every region (the server is stopping); later registrations are
        refused. Idempotent."""
        with self._lock:
            self._closed = True
            owners = {o for o, _ in self._regions}
        for owner in owners:
            self.unregister(None, owner)

    # ── data ───────────────────────────────────────────────────────────────

    @contextmanager
    def _using(self, name: str, owner: str, what: str = "") -> Iterator[_Region]:
        with self._lock:
            region = self._regions.get((owner, name))
            if region is None:
                raise SharedMemoryError(
                    "NOT_FOUND",
                    f"{what + ': ' if what else ''}no system shared memory region {name!r} is registered; "
                    "register it first",
                )
            region.users += 1
        try:
            yield region
        finally:
            with self._lock:
                region.users -= 1
                if region.gone and not region.users:
                    os.close(region.fd)

    @staticmethod
    def _window(region: _Region, offset: int, byte_size: int, what: str) -> int:
        """The object's offset of ``byte_size`` bytes at ``offset`` of ``region``, checked
        against its registered size and against the object as it is now."""
        s = region.status
        if offset < 0 or byte_size < 0 or offset + byte_size > s.byte_size:
            raise SharedMemoryError(
                "INVALID_ARG",
                f"{what}: offset {offset} + byte size {byte_size} is past the end of shared memory region "
                f"{s.name!r} ({s.byte_size} bytes)",
            )
        st = os.fstat(region.fd)
        if st.st_nlink == 0:
            raise SharedMemoryError(
                "INVALID_ARG",
                f"{what}: shared memory region {s.name!r} was removed by its client (its key {s.key!r} was "
                "unlinked); unregister it, and register a new one",
            )
        if st.st_size < s.offset + s.byte_size:
            raise SharedMemoryError(
                "INVALID_ARG",
                f"{what}: shared memory region {s.name!r} was shrunk by its client to {st.st_size} bytes "
                f"(it was registered as {s.byte_size} bytes at offset {s.offset} of {s.key!r})",
            )
        return s.offset + offset

    def read(self, name: str, offset: int, byte_size: int, owner: str, what: str = "") -> bytearray:
        """A copy of ``byte_size`` bytes at ``offset`` of the owner's region ``name``.

        Args:
            what: how errors name the reader (``"input 'x'"``).

        Raises:
            SharedMemoryError: ``NOT_FOUND``; ``INVALID_ARG``: past the region's end, or
                the client removed or shrank the object.
        """
        out = bytearray(byte_size)
        with self._using(name, owner, what) as region:
            what = what or f"region {name!r}"
            start = self._window(region, offset, byte_size, what)
            view, done = memoryview(out), 0
            while done < byte_size:
                n = os.preadv(region.fd, [view[done:]], start + done)
                if n <= 0:  # shrunk since the check: short, never SIGBUS
                    raise SharedMemoryError(
                        "INVALID_ARG", f"{what}: shared memory region {name!r} was shrunk by its client while read"
                    )
                done += n
        return out

    def write(self, name: str, offset: int, byte_size: int, data: Any, owner: str, what: str = "") -> int:
        """Write ``data`` (bytes-like) at ``offset`` of the owner's region ``name``, where
        the request gave ``byte_size`` bytes for it.

        Returns:
            The bytes written (``len(data)``).

        Raises:
            SharedMemoryError: ``INVALID_ARG``: ``data`` is larger than ``byte_size``
                (the message names the sizes), the window is past the region's end, or
                the client removed or shrank the object; ``NOT_FOUND``.
        """
        view = memoryview(data).cast("B")
        if view.nbytes > byte_size:
            raise SharedMemoryError(
                "INVALID_ARG",
                f"{what or 'the data'} needs {view.nbytes} bytes but its shared memory (region {name!r}) was "
                f"given {byte_size} (shared_memory_byte_size)",
            )
        with self._using(name, owner, what) as region:
            start = self._window(region, offset, byte_size, what or f"region {name!r}")
            done = 0
            while done < view.nbytes:
                done += os.pwrite(region.fd, view[done:], start + done)
        return view.nbytes
