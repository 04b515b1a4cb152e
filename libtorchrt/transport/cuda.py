"""Device memory shared between processes through CUDA IPC (used in both processes).

The front allocates a buffer on a GPU (:class:`DeviceBuffer`), exports its 64-byte IPC
handle once, and a worker on that GPU maps it once (:class:`OpenedBuffer`) and keeps
it for its lifetime: after that, a request is only offsets into the buffer plus a wait
on the buffer's interprocess event. The buffers are plain ``cuMemAlloc`` allocations of
the CUDA driver, not blocks of torch's caching allocator: an IPC handle names a whole
allocation, and the caching allocator's blocks live inside bigger segments (or, with
expandable segments, in memory that legacy IPC cannot export at all).

All memory is owned by the front. A worker only maps it, so a worker that dies (or is
killed) takes nothing with it that the front still uses.

The driver API is reached through ``ctypes`` (``libcuda.so.1``), with the device's
primary context (the one torch uses) made current around each call. Nothing here runs
per request except tensor views; nothing is imported from CUDA until a GPU is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

__all__ = [
    "IPC_HANDLE_BYTES",
    "CudaError",
    "DeviceBuffer",
    "OpenedBuffer",
    "Segment",
    "export_handle",
    "segment_of",
    "wrap",
]

#: Size of a CUDA IPC memory (and event) handle.
IPC_HANDLE_BYTES = 64
_LAZY_ENABLE_PEER_ACCESS = 1
_POINTER_ATTRIBUTE_BUFFER_ID = 7


class CudaError(RuntimeError):
    """A CUDA driver call failed (the message names the call and CUDA's error)."""


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_contexts: dict[int, ctypes.c_void_p] = {}


def _driver() -> ctypes.CDLL:
    global _lib
    with _lock:
        if _lib is None:
            torch.cuda.init()  # torch's runtime first: it owns the primary contexts
            lib = ctypes.CDLL("libcuda.so.1")
            ptr, size, uint = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint
            sigs: dict[str, list[Any]] = {
                "cuInit": [uint],
                "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
                "cuDevicePrimaryCtxRetain": [ctypes.POINTER(ptr), ctypes.c_int],
                "cuCtxPushCurrent_v2": [ptr],
                "cuCtxPopCurrent_v2": [ctypes.POINTER(ptr)],
                "cuMemAlloc_v2": [ctypes.POINTER(ctypes.c_uint64), size],
                "cuMemFree_v2": [ctypes.c_uint64],
                "cuIpcGetMemHandle": [ctypes.POINTER(_IpcHandle), ctypes.c_uint64],
                "cuIpcOpenMemHandle_v2": [ctypes.POINTER(ctypes.c_uint64), _IpcHandle, uint],
                "cuIpcCloseMemHandle": [ctypes.c_uint64],
                "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
                "cuPointerGetAttribute": [ptr, ctypes.c_int, ctypes.c_uint64],
                "cuMemGetAddressRange_v2": [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(size), ctypes.c_uint64],
            }
            for name, args in sigs.items():
                try:
                    fn = getattr(lib, name)
                except AttributeError:  # an older driver without the _v2 name
                    fn = getattr(lib, name.removesuffix("_v2"))
                    setattr(lib, name, fn)
                fn.argtypes = args
                fn.restype = ctypes.c_int
            _check(lib, lib.cuInit(0), "cuInit")
            _lib = lib
        return _lib


def _check(lib: ctypes.CDLL, rc: int, what: str) -> None:
    if rc != 0:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(rc, ctypes.byref(name))
        text = name.value.decode() if name.value else f"error {rc}"
        raise CudaError(f"{what} failed: {text}")


@contextlib.contextmanager
def _current(device: int) -> Iterator[ctypes.CDLL]:
    """Make ``device``'s primary context current on this thread for the block."""
    lib = _driver()
    with _lock:
        ctx = _contexts.get(device)
        if ctx is None:
            dev = ctypes.c_int()
            _check(lib, lib.cuDeviceGet(ctypes.byref(dev), device), f"cuDeviceGet({device})")
            ctx = ctypes.c_void_p()
            _check(lib, lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), f"cuDevicePrimaryCtxRetain({device})")
            _contexts[device] = ctx
    _check(lib, lib.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")
    try:
        yield lib
    finally:
        lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))


class _CudaArray:
    """Exposes ``nbytes`` of device memory at ``ptr`` to ``torch.as_tensor`` (no copy).

    The tensor keeps this object alive; this object does not own the memory.
    """

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 2,
        }


def _wrap(ptr: int, nbytes: int, device: int) -> torch.Tensor:
    return torch.as_tensor(_CudaArray(ptr, nbytes), device=torch.device("cuda", device))


def wrap(ptr: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...], device: int) -> tuple[torch.Tensor, Any]:
    """A tensor over ``nbytes`` of device memory at ``ptr``, without copying.

    Returns:
        ``(tensor, owner)``: the tensor's storage holds ``owner`` until the last tensor
        sharing that storage is freed, so a ``weakref.finalize`` on ``owner`` fires
        exactly when the memory is no longer used by any tensor.
    """
    owner = _CudaArray(ptr, nbytes)
    flat = torch.as_tensor(owner, device=torch.device("cuda", device))
    return flat.view(dtype).view(shape), owner


class Segment(NamedTuple):
    """The device allocation holding a pointer: its driver-wide unique id, base, size."""

    buffer_id: int
    base: int
    size: int


def segment_of(ptr: int, device: int) -> Segment:
    """Find the allocation (e.g. a segment of torch's caching allocator) holding ``ptr``.

    Raises:
        CudaError: the pointer is not device memory the driver knows.
    """
    with _current(device) as lib:
        buffer_id = ctypes.c_uint64()
        _check(
            lib,
            lib.cuPointerGetAttribute(ctypes.byref(buffer_id), _POINTER_ATTRIBUTE_BUFFER_ID, ptr),
            "cuPointerGetAttribute(BUFFER_ID)",
        )
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        _check(lib, lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ptr), "cuMemGetAddressRange")
    return Segment(buffer_id.value, base.value, size.value)


def export_handle(base: int, device: int) -> bytes:
    """The IPC handle of the allocation starting at ``base`` (which this process owns).

    Raises:
        CudaError: the allocation cannot be exported (e.g. memory of torch's expandable
            segments, which legacy CUDA IPC does not cover).
    """
    with _current(device) as lib:
        handle = _IpcHandle()
        _check(lib, lib.cuIpcGetMemHandle(ctypes.byref(handle), base), "cuIpcGetMemHandle")
    # (not handle.reserved: ctypes cuts a c_char array at its first zero byte)
    return ctypes.string_at(ctypes.addressof(handle), IPC_HANDLE_BYTES)


class DeviceBuffer:
    """``nbytes`` of memory on GPU ``device``, allocated by this process and exported.

    Attributes:
        handle: the 64-byte IPC handle another process opens with :class:`OpenedBuffer`.
        tensor: a flat ``uint8`` CUDA tensor over the whole buffer.
    """

    def __init__(self, device: int, nbytes: int) -> None:
        self.device = device
        self.nbytes = nbytes
        self._ptr = 0
        with _current(device) as lib:
            ptr = ctypes.c_uint64()
            _check(lib, lib.cuMemAlloc_v2(ctypes.byref(ptr), nbytes), f"cuMemAlloc({nbytes}) on cuda:{device}")
            self._ptr = ptr.value
        try:
            self.handle = export_handle(self._ptr, device)
        except BaseException:
            self.close()
            raise
        self.tensor = _wrap(self._ptr, nbytes, device)

    @property
    def address(self) -> int:
        return self._ptr

    def view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return _view(self.tensor, offset, nbytes, dtype, shape)

    def close(self) -> None:
        """Free the memory (every process that mapped it must be done with it)."""
        ptr, self._ptr = self._ptr, 0
        self.tensor = torch.empty(0)
        if ptr:
            with _current(self.device) as lib:
                _check(lib, lib.cuMemFree_v2(ptr), "cuMemFree")


class OpenedBuffer:
    """Another process's :class:`DeviceBuffer`, mapped into this one (once).

    Args:
        device: the GPU it lives on (this process's device).
        handle: its IPC handle.
        nbytes: its size.
    """

    def __init__(self, device: int, handle: bytes, nbytes: int) -> None:
        if len(handle) != IPC_HANDLE_BYTES:
            raise ValueError(f"a CUDA IPC handle has {IPC_HANDLE_BYTES} bytes, got {len(handle)}")
        self.device = device
        self.nbytes = nbytes
        raw = _IpcHandle()
        ctypes.memmove(ctypes.addressof(raw), handle, IPC_HANDLE_BYTES)
        with _current(device) as lib:
            ptr = ctypes.c_uint64()
            _check(
                lib,
                lib.cuIpcOpenMemHandle_v2(ctypes.byref(ptr), raw, _LAZY_ENABLE_PEER_ACCESS),
                f"cuIpcOpenMemHandle on cuda:{device}",
            )
        self._ptr = ptr.value
        self.tensor = _wrap(self._ptr, nbytes, device)

    def view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return _view(self.tensor, offset, nbytes, dtype, shape)

    def close(self) -> None:
        ptr, self._ptr = self._ptr, 0
        self.tensor = torch.empty(0)
        if ptr:
            with _current(self.device) as lib:
                _check(lib, lib.cuIpcCloseMemHandle(ptr), "cuIpcCloseMemHandle")


def _view(flat: torch.Tensor, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if offset < 0 or offset + nbytes > flat.numel():
        raise ValueError(f"slot [{offset}, {offset + nbytes}) lies outside the {flat.numel()}-byte device buffer")
    return flat[offset : offset + nbytes].view(dtype).view(shape)
