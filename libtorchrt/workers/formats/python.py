"""Python-module models (``model.py`` defining an ``nn.Module``): the loader (worker process).

This is Triton's "Python-based PyTorch runtime" (``runtime: "model.py"``): the version
directory holds ``model.py``, which defines the model's class, and optionally its
weights as a state dict next to it (``model.pt``). Because the file is ordinary Python,
users put their pre- and post-processing there too (what a TorchServe handler does), so
its method may take and return strings and numpy arrays as well as tensors.

Loading, in order (each step's failure is a :class:`LoadError` saying what was wrong and
what is expected):

1. import the file as a module of its own (``libtorchrt_model_<name>``), its directory
   first on ``sys.path`` so that it imports the files beside it by their plain names;
2. choose the class: the module's attribute ``Model`` if it is an ``nn.Module`` subclass
   (so ``Model = Net`` picks ``Net``, even one imported from a sibling file), else the one
   ``nn.Module`` subclass the file defines (several, and none named ``Model``: refused);
3. instantiate it with no arguments;
4. load ``<stem>.pt`` (or ``<stem>.pth``) beside the file, if there is one, as a state
   dict (``torch.load(weights_only=True)``: never a pickled module), strictly;
5. move it to the instance's device, ``eval()``, and take the method to run
   (``MODULE_METHOD_NAME``; ``forward`` is called through the module, so hooks run);
6. ``torch.compile`` it if ``TORCH_COMPILE_OPTIONAL_PARAMETERS`` asks (lazily: the first
   call compiles, so warm-up runs pay for it).

Inputs are the method's arguments by name; their annotations give their kinds
(``torch.Tensor``; ``list[str]``/``List[str]``/``Sequence[str]``: strings;
``numpy.ndarray``: a tensor handed over as ``tensor.numpy()``; anything else: not
checked). Results flatten to outputs: a tensor or numpy array is one output, a
``list[str]`` one strings output, a tuple or list of those one output each, and a dict
the declared outputs (see :func:`_dict_outputs`).
"""

from __future__ import annotations

import collections.abc
import importlib.util
import inspect
import os
import pickle
import re
import sys
import traceback
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ...config.formats import COMPILE_KEY, compile_options, zip_kind
from ...transport import tensors as tensor_io
from ..outputs import OutputMismatchError
from .runner import LoadError, LoadRequest, Output, Runner

__all__ = ["load"]

#: The class a model.py names to be served when it defines several.
CLASS_NAME = "Model"
#: Weight files looked for beside ``<stem>.py``, as ``<stem><suffix>``.
WEIGHT_SUFFIXES = (".pt", ".pth")
#: Names listed at most per kind in a state dict mismatch.
_SHOW = 5
#: A declared output naming a result's key: ``RESULT[key]``.
_RESULT_KEY = re.compile(r"^RESULT\[(.+)\]$")
#: A declared output naming a result by position: ``<anything>__<i>``.
_ORDINAL = re.compile(r"^.+__(\d+)$")


def load(req: LoadRequest) -> Runner:
    """Import ``req.path``, build its ``nn.Module`` with its weights, and describe its method.

    Raises:
        LoadError: the file fails to import, defines no usable class, the class cannot
            be built with no arguments, the weight file is not a matching state dict,
            or the method is missing or takes ``*args``/``**kwargs``.
        ConfigError: ``TORCH_COMPILE_OPTIONAL_PARAMETERS`` is malformed (the front
            checks it first; this is the worker's guard).
    """
    module_name = _module_name(req.model)
    mod = _import(req, module_name)
    cls = _choose_class(req, mod)
    model = _instantiate(req, cls)
    model.to(req.device)
    notes: list[str] = []
    weights = _weight_file(req)
    if weights is not None:
        _load_weights(req, model, weights)
    elif any(True for _ in model.parameters()):
        notes.append(
            f"no {_stem(req.path)}.pt beside {os.path.basename(req.path)}: {cls.__name__} keeps the weights its "
            "__init__ gives it; save model.state_dict() there to serve trained weights"
        )
    model.eval()
    if req.on_weights is not None:  # before torch.compile
        req.on_weights(model)
    method = _method(req, model, cls)
    # forward is called through the module so that its hooks run, as model(x) would.
    target: Callable[..., Any] = model if req.method == "forward" else method

    names, kinds, numpy_at, dict_input = _arguments(req, cls, method)
    named = bool(req.output_names) and _returns_dict(method)
    flatten = _flattener(req, named=named)

    info: dict[str, Any] = {"compiled": False}
    fn = target
    if COMPILE_KEY in req.parameters:
        opts = compile_options(req.model, req.parameters[COMPILE_KEY])
        info["compile_options"] = opts
        info["compile_cache"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if not opts.get("disable"):
            fn = torch.compile(target, **opts)  # lazy: the first call compiles
            info["compiled"] = True

    if numpy_at:

        def run(inputs: list[Any]) -> list[Output]:
            args = list(inputs)
            for i in numpy_at:
                args[i] = args[i].numpy()
            return flatten(fn(*args))

    else:

        def run(inputs: list[Any]) -> list[Output]:
            return flatten(fn(*inputs))

    return Runner(
        format="python",
        run=run,
        inputs=names,
        kinds=kinds,
        outputs=list(req.output_names) if named else [],
        dict_input=dict_input,
        notes=notes,
        info=info,
    )


# -- importing -------------------------------------------------------------------------


def _module_name(model: str) -> str:
    """A module name of the model's own, not yet in ``sys.modules`` (tests load many)."""
    base = "libtorchrt_model_" + re.sub(r"[^0-9A-Za-z_]", "_", model)
    name, n = base, 1
    while name in sys.modules:
        n += 1
        name = f"{base}_{n}"
    return name


def _import(req: LoadRequest, name: str) -> types.ModuleType:
    """Import the file as module ``name``; registered in ``sys.modules`` because
    ``dataclasses``, ``pickle`` and ``torch.compile`` look classes up by module name."""
    path = req.path
    directory = os.path.dirname(os.path.abspath(path))
    # First, so that a sibling file wins over an installed module of the same name; kept
    # after the import, because a model may import its siblings lazily, in forward.
    inserted = not sys.path or sys.path[0] != directory
    if inserted:
        sys.path.insert(0, directory)
    importlib.invalidate_caches()  # the sibling files may be newer than the finder's caches
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LoadError(f"model {req.model!r}: {path} cannot be imported; expected a Python source file (model.py)")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except (Exception, SystemExit) as e:  # (sys.exit() in a model.py must not end the worker unexplained)
        sys.modules.pop(name, None)
        if inserted:
            sys.path.remove(directory)
        raise LoadError(f"model {req.model!r}: importing {path} failed{_where(e, path)}: {_describe(e)}") from e
    return mod


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _where(e: BaseException, path: str) -> str:
    """`` at line N (`code`)``: the last line of ``path`` in ``e``'s traceback, and the
    place it was raised if that is in another file (a sibling module, torch)."""
    if isinstance(e, SyntaxError) and e.filename and _same_file(e.filename, path):
        return _at(e.lineno, e.text)  # (compiling the file: no frame of it in the traceback)
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith("<frozen")]
    mine = [f for f in frames if _same_file(f.filename, path)]
    if not mine:
        return ""
    out = _at(mine[-1].lineno, mine[-1].line)
    if isinstance(e, SyntaxError) and e.filename:  # in a sibling file it imports
        out += f", in {e.filename} line {e.lineno}"
    elif frames[-1] is not mine[-1]:
        out += f", raised in {frames[-1].filename} line {frames[-1].lineno}"
    return out


def _at(line: int | None, text: str | None) -> str:
    text = (text or "").strip()
    return f" at line {line}" + (f" (`{text}`)" if text else "")


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


# -- the class -------------------------------------------------------------------------


def _choose_class(req: LoadRequest, mod: types.ModuleType) -> type[torch.nn.Module]:
    """The module's ``Model`` if it is an ``nn.Module`` subclass (defined there or
    imported), else the one ``nn.Module`` subclass defined in the file.

    A file that defines several (a model and its blocks) names the one to serve
    ``Model``, or aliases it: ``Model = Net``. Triton takes the first subclass in
    ``dir()`` order, which silently serves a block; we refuse instead.
    """
    chosen = getattr(mod, CLASS_NAME, None)
    if _is_module_class(chosen):
        return typing.cast("type[torch.nn.Module]", chosen)
    defined: list[type[torch.nn.Module]] = []
    imported: list[str] = []
    for attr, value in vars(mod).items():
        if not _is_module_class(value) or value is torch.nn.Module:
            continue
        if value.__module__ == mod.__name__:
            if value not in defined:
                defined.append(value)
        else:
            imported.append(attr)
    file = os.path.basename(req.path)
    if len(defined) == 1:
        return defined[0]
    if not defined:
        hint = (
            f"; it imports {', '.join(imported)}: to serve one, write `{CLASS_NAME} = {imported[0]}`"
            if imported
            else ""
        )
        raise LoadError(
            f"model {req.model!r}: {file} defines no torch.nn.Module subclass{hint}; "
            f"expected a class such as `class {CLASS_NAME}(torch.nn.Module)`"
        )
    listed = ", ".join(c.__name__ for c in defined)
    raise LoadError(
        f"model {req.model!r}: {file} defines several torch.nn.Module subclasses ({listed}); "
        f"name the one to serve {CLASS_NAME!r}, or add `{CLASS_NAME} = {defined[-1].__name__}`"
    )


def _is_module_class(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, torch.nn.Module)


def _instantiate(req: LoadRequest, cls: type[torch.nn.Module]) -> torch.nn.Module:
    try:
        return cls()
    except Exception as e:
        raise LoadError(
            f"model {req.model!r}: {cls.__name__}() failed{_where(e, req.path)}: {_describe(e)}; "
            "the class is built with no arguments: give its parameters defaults"
        ) from e


# -- the weights -----------------------------------------------------------------------


def _weight_file(req: LoadRequest) -> str | None:
    """``<stem>.pt`` or ``<stem>.pth`` beside the file (None: neither).

    Raises:
        LoadError: both are there (which one is meant?).
    """
    base = os.path.join(os.path.dirname(req.path), _stem(req.path))
    found = [base + s for s in WEIGHT_SUFFIXES if os.path.isfile(base + s)]
    if len(found) > 1:
        raise LoadError(
            f"model {req.model!r}: both {' and '.join(os.path.basename(f) for f in found)} are beside "
            f"{os.path.basename(req.path)}; expected one state dict: remove the other"
        )
    return found[0] if found else None


#: What a weight file is when it is another format's model (``zip_kind``), and what to do.
_OTHER_FORMATS = {
    "torchscript": "a TorchScript archive: serve it as format 'torchscript', without model.py",
    "aoti": "an AOTInductor package: serve it as format 'aoti', without model.py",
    "exported": "a torch.export program: serve it as format 'exported', without model.py",
}


def _load_weights(req: LoadRequest, model: torch.nn.Module, path: str) -> None:
    """Load the state dict at ``path`` into ``model``, strictly.

    Raises:
        LoadError: not a state dict (a pickled module, a TorchScript archive, a training
            checkpoint), or its keys or shapes do not match the module's.
    """
    file = os.path.basename(path)
    prefix = f"model {req.model!r}: {file}"
    # Told apart by the zip's directory first: torch.load would warn about, or try to
    # unpickle, a file that is another format's model.
    what = _OTHER_FORMATS.get(zip_kind(path) or "")
    if what is not None:
        raise LoadError(f"{prefix} is {what}; or save torch.save(model.state_dict(), {file!r}) there")
    try:
        state = torch.load(path, weights_only=True, map_location=req.device)
    except pickle.UnpicklingError as e:
        # weights_only refuses any object but tensors and plain containers: a whole pickled
        # module (torch.save(model)) lands here.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(
            f"{prefix} is not a state dict (torch.load(weights_only=True) refused it: {first}); "
            "a pickled module is not loaded, for safety: save torch.save(model.state_dict(), "
            f"{file!r}) instead"
        ) from e
    except Exception as e:
        raise LoadError(
            f"{prefix} cannot be loaded ({_describe(e)}); expected torch.save(model.state_dict(), {file!r})"
        ) from e
    if not isinstance(state, Mapping):
        raise LoadError(
            f"{prefix} holds a {type(state).__name__}; expected a state dict: torch.save(model.state_dict(), {file!r})"
        )
    if state and not any(isinstance(v, torch.Tensor) for v in state.values()):
        keys = ", ".join(repr(k) for k in list(state)[:_SHOW])
        raise LoadError(
            f"{prefix} is a mapping without tensors (keys {keys}): a training checkpoint? expected the "
            f"state dict itself: torch.save(model.state_dict(), {file!r})"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LoadError(f"{prefix} does not match {type(model).__name__}: {_mismatch(model, state, e)}") from e


def _mismatch(model: torch.nn.Module, state: Mapping[str, Any], error: RuntimeError) -> str:
    """Missing keys, unexpected keys and size mismatches, a few of each; torch's own
    message lists every key, hundreds for a real network."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    sizes = [f"{k} is {list(got[k])}, expected {list(want[k])}" for k in want if k in got and got[k] != want[k]]
    parts = [
        f"{label} ({len(items)}): {', '.join(items[:_SHOW])}{', ...' if len(items) > _SHOW else ''}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("size mismatches", sizes))
        if items
    ]
    if not parts:  # a load hook or a custom _load_from_state_dict refused it
        return str(error).strip()
    return "; ".join(parts) + "; expected the state dict of this class (model.state_dict())"


# -- the method ------------------------------------------------------------------------


def _method(req: LoadRequest, model: torch.nn.Module, cls: type) -> Callable[..., Any]:
    if req.method == "forward" and getattr(cls, "forward", None) is torch.nn.Module.forward:
        raise LoadError(f"model {req.model!r}: {cls.__name__} defines no forward(); expected the method to serve")
    method = getattr(model, req.method, None)
    if method is None or not callable(method):
        got = "is missing" if method is None else f"is a {type(method).__name__}, not a method"
        raise LoadError(
            f"model {req.model!r}: {cls.__name__}.{req.method} {got}; expected the method named by "
            "MODULE_METHOD_NAME (default forward)"
        )
    return typing.cast("Callable[..., Any]", method)


def _arguments(
    req: LoadRequest, cls: type, method: Callable[..., Any]
) -> tuple[list[str], list[str | None], tuple[int, ...], bool]:
    """The method's inputs: names, kinds, which take numpy arrays, and whether it takes
    one ``dict[str, Tensor]`` (the loop assembles it from the request, as for TorchScript).

    Raises:
        LoadError: ``*args``/``**kwargs``, a keyword-only argument without a default, or
            numpy arguments on a GPU instance.
    """
    try:
        sig = inspect.signature(method)
    except (TypeError, ValueError) as e:
        raise LoadError(f"model {req.model!r}: {cls.__name__}.{req.method} has no signature ({e})") from e
    hints = _hints(method)
    names: list[str] = []
    kinds: list[str | None] = []
    numpy_at: list[int] = []
    dict_arg = False
    where = f"model {req.model!r}: {cls.__name__}.{req.method}"
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            star = "*" if p.kind == p.VAR_POSITIONAL else "**"
            raise LoadError(
                f"{where} takes {star}{p.name}; expected named arguments (requests bind inputs to them by name)"
            )
        if p.kind == p.KEYWORD_ONLY:
            if p.default is p.empty:
                raise LoadError(f"{where}: keyword-only argument {p.name!r} has no default; expected it positional")
            continue  # left to its default: requests bind by position
        kind = _kind(hints.get(p.name, p.annotation))
        if kind == "numpy":
            if req.device != "cpu":
                raise LoadError(
                    f"{where}: argument {p.name!r} takes a numpy array, which holds CPU memory only, but this "
                    f"instance runs on {req.device}; expected torch.Tensor (or serve it on the CPU)"
                )
            numpy_at.append(len(names))
        dict_arg = kind == "dict"
        names.append(p.name)
        kinds.append("tensor" if kind == "numpy" else None if kind == "dict" else kind)
    return names, kinds, tuple(numpy_at), dict_arg and len(names) == 1


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """The function's resolved annotations; ``{}`` if they cannot be resolved (a name
    only a type checker knows), when the raw annotations (strings) are read instead."""
    try:
        return typing.get_type_hints(fn)
    except Exception:
        return {}


_STRINGS_TEXT = re.compile(r"^(typing\.)?(list|List|Sequence|collections\.abc\.Sequence)\[str\]$")
_TENSOR_TEXT = re.compile(r"^(torch\.)?Tensor$")
_NUMPY_TEXT = re.compile(r"^(np|numpy)\.(ndarray|typing\.NDArray)(\[.*\])?$|^NDArray(\[.*\])?$")


def _kind(ann: Any) -> str | None:
    """``"tensor"``, ``"strings"``, ``"numpy"``, ``"dict"`` (``dict[str, Tensor]``) or None."""
    if ann is inspect.Parameter.empty:
        return None
    if isinstance(ann, str):  # unresolved: read as text
        text = ann.replace(" ", "")
        if text.startswith("Optional[") and text.endswith("]"):
            text = text[len("Optional[") : -1]
        if _TENSOR_TEXT.match(text):
            return "tensor"
        if _STRINGS_TEXT.match(text):
            return "strings"
        if _NUMPY_TEXT.match(text):
            return "numpy"
        return None
    args = typing.get_args(ann)
    origin = typing.get_origin(ann)
    if origin is typing.Union or origin is types.UnionType:
        rest = [a for a in args if a is not type(None)]
        return _kind(rest[0]) if len(rest) == 1 else None
    if isinstance(ann, type) and issubclass(ann, torch.Tensor):
        return "tensor"
    if ann is np.ndarray or origin is np.ndarray:
        return "numpy"
    if origin in (list, collections.abc.Sequence) and args == (str,):
        return "strings"
    if origin in (dict, collections.abc.Mapping) and args == (str, torch.Tensor):
        return "dict"
    return None


def _returns_dict(method: Callable[..., Any]) -> bool:
    """The method is annotated to return a mapping (``dict[str, Tensor]``, a TypedDict)."""
    ann = _hints(method).get("return")
    if ann is None:
        return False
    if isinstance(ann, str):  # unresolved: read as text
        return bool(re.match(r"^(typing\.)?(dict|Dict|Mapping)\b", ann.strip()))
    if typing.is_typeddict(ann):
        return True
    origin = typing.get_origin(ann) or ann
    return isinstance(origin, type) and issubclass(origin, Mapping)


# -- the results -----------------------------------------------------------------------


def _flattener(req: LoadRequest, *, named: bool) -> Callable[[Any], list[Output]]:
    """The function from a call's result to the outputs, built once per model."""
    from_dict = _dict_outputs(req, named)

    def flatten(result: Any) -> list[Output]:
        if isinstance(result, torch.Tensor):
            return [result]
        if isinstance(result, list) and all(isinstance(s, str) for s in result):
            # (an empty list too: a model has at least one output, so [] is no strings)
            return [tensor_io.Strings.of(result)]
        if isinstance(result, (tuple, list)):
            return [_leaf(item, f"RESULT[{i}]") for i, item in enumerate(result)]
        if isinstance(result, Mapping):
            return from_dict(result)
        if isinstance(result, np.ndarray):
            return [_leaf(result, "RESULT")]
        raise TypeError(
            f"model {req.model!r}: {req.method}() returned {_what(result)}; expected a Tensor, a numpy array, "
            "a list of str, or a tuple/list/dict of them"
        )

    return flatten


def _dict_outputs(req: LoadRequest, named: bool) -> Callable[[Mapping[Any, Any]], list[Output]]:
    """How a dict result becomes outputs: the declared outputs, each the value of its
    name (``logits``) or of ``RESULT[<key>]``'s key; failing those, an ordinal name
    (``OUTPUT__<i>``) is the dict's i-th value, as PT2 names leaves (``pt2names.py``).

    The outputs come in declared order when ``Runner.outputs`` names them (``named``:
    the method is annotated to return a dict). Otherwise the front names them as it
    names any unnamed results (``front/binding.py``'s ``output_positions``: by the
    ``__<i>`` suffix when every declared name has one, else in declared order), so they
    come in that order.
    """
    declared = list(req.output_names)
    wanted: list[tuple[str, tuple[str, ...], int | None]] = []  # name, keys to try, ordinal
    for name in declared:
        m = _RESULT_KEY.match(name)
        keys = (name, m.group(1)) if m else (name,)
        o = _ORDINAL.match(name)
        wanted.append((name, keys, int(o.group(1)) if o else None))
    by_suffix = not named and bool(wanted) and all(w[2] is not None for w in wanted)
    if by_suffix:
        wanted.sort(key=lambda w: typing.cast(int, w[2]))
        gaps = [w[2] for w in wanted] != list(range(len(wanted)))
    else:
        gaps = False

    def from_dict(result: Mapping[Any, Any]) -> list[Output]:
        if not wanted:
            raise TypeError(
                f"model {req.model!r}: the model returned a dict (keys {_keys(result)}); declare its outputs "
                "(config output names = the keys) to name them"
            )
        if gaps:
            raise TypeError(
                f"model {req.model!r}: the model returned a dict, and the declared outputs {declared} number "
                f"its values by their __<i> suffix with gaps; expected suffixes 0..{len(declared) - 1}, or "
                "names that are its keys"
            )
        out: list[Output] = []
        values: list[Any] | None = None
        for name, keys, ordinal in wanted:
            for key in keys:
                if key in result:
                    out.append(_leaf(result[key], f"RESULT[{key}]"))
                    break
            else:
                if values is None:
                    values = list(result.values())
                if ordinal is None or ordinal >= len(values):
                    raise OutputMismatchError(
                        f"model {req.model!r}: declared output {name!r} is not a key of the dict the model "
                        f"returned (keys {_keys(result)}); expected the keys as output names"
                    )
                out.append(_leaf(values[ordinal], f"RESULT[{ordinal}]"))
        return out

    return from_dict


def _keys(result: Mapping[Any, Any]) -> str:
    keys = list(result)
    return ", ".join(repr(k) for k in keys[:10]) + (", ..." if len(keys) > 10 else "")


def _leaf(value: Any, where: str) -> Output:
    """One output as the wire takes it: a tensor (numpy arrays become one, sharing
    memory when they can), or strings (a list of str, or a numpy array of str/bytes).

    Raises:
        TypeError: anything else (names ``where``, e.g. "RESULT[0]").
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tensor_io.Strings.of(value)
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "USO":
            items = value.ravel().tolist()
            if all(isinstance(s, str) for s in items):
                return tensor_io.Strings.of(items)
            if all(isinstance(s, bytes) for s in items):
                return tensor_io.Strings(items)
            raise TypeError(f"{where} is a numpy array of {value.dtype} objects; expected numbers, str or bytes")
        array = np.ascontiguousarray(value)
        if not array.flags.writeable:  # torch.from_numpy warns about (and shares) read-only memory
            array = array.copy()
        try:
            return torch.from_numpy(array)
        except TypeError as e:
            raise TypeError(f"{where} is a numpy array of {value.dtype}, which torch cannot hold ({e})") from e
    raise TypeError(f"{where} is {_what(value)}; expected a Tensor, a numpy array or a list of str")


def _what(value: Any) -> str:
    """What a result is, for a message: ``None``, ``a float (0.5)``, ``a list of int, str``."""
    if value is None:
        return "None"
    if isinstance(value, list):
        return f"a list of {', '.join(sorted({type(v).__name__ for v in value}))}"
    name = type(value).__name__
    article = "an" if name[:1] in "aeiou" else "a"
    if isinstance(value, (int, float, bool, str, np.generic)):
        return f"{article} {name} ({value!r})"
    return f"{article} {name}"
