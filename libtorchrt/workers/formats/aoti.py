"""AOTInductor packages (``torch._inductor.aoti_compile_and_package``): the loader
(worker process).

A package is a zip holding a model compiled ahead of time for one device kind: a
shared library, its generated C++ wrapper, and metadata (``AOTI_DEVICE_KEY``). Before
loading the library (which, for the wrong device, fails with a message about missing
kernels or aborts), this reads the zip: the device it was compiled for, and the first
dimension each input may have, which the wrapper's input checks spell out::

    input_handles[0]: dim value is too small at 0, expected it to be >= 2
    input_handles[0]: dim value is too large at 0, expected to be <= 64
    input_handles[0]: unmatched dim value at 0, expected: 4

Those checks only run when ``AOTI_RUNTIME_CHECK_INPUTS`` is set; without them an input
of the wrong size runs anyway, and a package exported with a static first dimension
then returns wrong numbers (or reads out of bounds). :func:`load` turns them on for the
worker unless the environment says otherwise (``AOTI_RUNTIME_CHECK_INPUTS=0``).

The batch range read from the checks starts at 2 for a ``Dim(min=1)``: export treats
sizes 0 and 1 apart (they specialize), so the compiled code assumes at least 2. One
row runs correctly without the checks, but is refused with them; the loop pads a batch
smaller than ``batch_range[0]`` (``worker.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterator

from . import pt2call
from .runner import LoadError, LoadRequest, Runner

__all__ = ["load"]

#: ``<archive>/data/aotinductor/<model name>/<file>``: a package's compiled model files.
_ENTRY = re.compile(r"(?:^|/)data/aotinductor/([^/]+)/([^/]+)$")
#: The model ``aoti_load_package`` loads when not told which.
_MODEL = "model"
#: The generated wrapper's checks of an input's first dimension.
_TOO_SMALL = re.compile(r'input_handles\[(\d+)\]: dim value is too small at 0, [\s<"]*expected it to be >= (\d+)')
_TOO_LARGE = re.compile(r'input_handles\[(\d+)\]: dim value is too large at 0, [\s<"]*expected to be <= (\d+)')
_STATIC = re.compile(r'input_handles\[(\d+)\]: unmatched dim value at 0, [\s<"]*expected: (\d+)')


@contextlib.contextmanager
def _extracted_privately() -> Iterator[None]:
    """Let ``aoti_load_package`` extract the package into a directory of ours, and
    remove that once it is loaded.

    The loader unpacks the shared library into a fresh ``$TMPDIR/aotinductor_*`` and
    never removes it: every worker start would leave a copy of the package in /tmp.
    The library is mapped once loaded, so its file can go at once (Linux keeps a mapped
    file's pages until they are unmapped); nothing is left behind however the worker
    exits.
    """
    private = tempfile.mkdtemp(prefix="libtorchrt-aoti-")
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = private
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before
        shutil.rmtree(private, ignore_errors=True)


def load(req: LoadRequest) -> Runner:
    """Check, load and describe an AOTInductor package.

    Raises:
        LoadError: the file is not an AOTInductor package (says what it is); it was
            compiled for another device than the instance's; ``max_batch_size`` is
            more than its first dimension takes; torch cannot load it (torch's
            message).
    """
    import torch.utils._pytree as pytree
    from torch._inductor import aoti_load_package

    device, wrappers = _read_package(req)
    kind = req.device.split(":", 1)[0]
    notes: list[str] = []
    if req.on_weights is not None:
        notes.append(
            "ENABLE_WEIGHT_SHARING: an AOTInductor package's weights live in its compiled library's own constant "
            "buffers (sharing them across processes needs its user-managed constants, not used yet): each "
            "instance holds its own copy"
        )
    if device is None:
        notes.append("the package's metadata does not say which device it was compiled for (AOTI_DEVICE_KEY)")
    elif device != kind:
        raise LoadError(
            f"model {req.model!r}: {req.path} was compiled for {device!r}, but this instance runs on {req.device!r}; "
            f"compile the package for {kind!r} (export and aoti_compile_and_package with the model and inputs on "
            f"that device), or serve it from {'KIND_GPU' if device == 'cuda' else 'KIND_CPU'} instances "
            "(instance_group)"
        )

    batch_range, static = _batch_range(wrappers)
    if not wrappers:
        notes.append(
            "the package holds no generated wrapper code (*.wrapper.cpp), so the rows one call accepts are not "
            "known; requests of a size it was not compiled for fail when run"
        )
    pt2call.check_batch(req, batch_range, static=static, artifact="package")

    # The wrapper reads this once, at its first run: set it before that. The checks cost
    # a few comparisons per input; without them a wrong size is not an error but a wrong
    # (or out-of-bounds) result.
    os.environ.setdefault("AOTI_RUNTIME_CHECK_INPUTS", "1")
    try:
        with _extracted_privately():
            if kind == "cuda":
                index = int(req.device.split(":", 1)[1]) if ":" in req.device else 0
                compiled = aoti_load_package(req.path, device_index=index)
            else:
                compiled = aoti_load_package(req.path)
        in_json, out_json = compiled.loader.get_call_spec()
        in_spec = pytree.treespec_loads(in_json)
        out_spec = pytree.treespec_loads(out_json)
    except Exception as e:  # torch raises RuntimeError, and others from its Python side
        raise LoadError(f"model {req.model!r}: torch cannot load the AOTInductor package {req.path}: {e}") from e

    return pt2call.make_runner(
        "aoti",
        # AOTICompiledModel.__call__ parses the call spec's JSON at every call; the
        # loader's run takes the flat tensors directly.
        compiled.loader.run,
        in_spec,
        out_spec,
        req,
        batch_range=batch_range,
        notes=notes,
        info={
            "package_device": device,
            "batch_range": list(batch_range) if batch_range else None,
            "input_checks": os.environ["AOTI_RUNTIME_CHECK_INPUTS"] not in ("", "0"),
        },
        flat=True,
    )


def _read_package(req: LoadRequest) -> tuple[str | None, list[str]]:
    """The device a package was compiled for (None: not said), and its generated
    wrappers' source, read from the zip without loading anything.

    Raises:
        LoadError: not a zip, or a zip without AOTInductor entries (says what it is).
    """
    try:
        with zipfile.ZipFile(req.path) as z:
            entries = [(m, name) for name in z.namelist() if (m := _ENTRY.search(name)) is not None]
            # A package may hold several models; aoti_load_package loads "model".
            if any(m.group(1) == _MODEL for m, _ in entries):
                entries = [(m, name) for m, name in entries if m.group(1) == _MODEL]
            device = None
            wrappers = []
            for m, name in entries:
                file = m.group(2)
                if file.endswith("_metadata.json") and device is None:
                    meta = json.loads(z.read(name))
                    if isinstance(meta, dict) and meta.get("AOTI_DEVICE_KEY"):
                        device = str(meta["AOTI_DEVICE_KEY"])
                elif file.endswith(".wrapper.cpp"):
                    wrappers.append(z.read(name).decode("utf-8", "replace"))
    except (OSError, zipfile.BadZipFile, zlib.error, ValueError, EOFError) as e:  # ValueError: bad JSON
        raise LoadError(
            f"model {req.model!r}: {req.path} is not a valid AOTInductor package: "
            f"{pt2call.describe(req.path, 'aoti', e)}"
        ) from e
    if not entries:
        raise LoadError(
            f"model {req.model!r}: {req.path} is not a valid AOTInductor package (no data/aotinductor/ entries): "
            f"{pt2call.describe(req.path, 'aoti')}"
        )
    return device, wrappers


def _batch_range(wrappers: list[str]) -> tuple[tuple[int, int] | None, bool]:
    """The rows one call accepts, from the wrappers' checks of every input's first
    dimension, and whether it is static (fixed at export).

    Several inputs: the range all of them accept. An input without a check of its first
    dimension (a scalar) does not bound it.
    """
    if not wrappers:
        return None, False
    source = "\n".join(wrappers)
    statics = {int(n) for _, n in _STATIC.findall(source)}
    if statics:
        # Two inputs fixed at different sizes cannot be batched together either; the
        # smallest is as good a report as any (check_batch refuses batching them).
        n = min(statics)
        return (n, n), True
    low = max((int(n) for _, n in _TOO_SMALL.findall(source)), default=1)
    high = min((int(n) for _, n in _TOO_LARGE.findall(source)), default=pt2call.NO_MAX)
    return (low, high), False
