"""Declared msgpack messages and the codec built from them (used in every process).

A message is a dataclass made by :func:`message`: a ``KIND`` number, then its fields in
order, each declared with :func:`spec`: what its value must be (:class:`Int`,
:class:`List`, ... ), its default, and the text of the error that refuses it. A
:class:`Codec` takes a set of messages and writes, once, at import, the Python source
of one encoder and of one decoder per message from their declarations: every field is
checked, each by code written for it rather than by a generic walk over the fields, as a
hand-written decoder would (``Codec.source`` shows the code; its cost against the
hand-written codecs it replaced is in docs/measurements/codec.txt).

On the wire a message is a msgpack array ``[KIND, field, field, ...]`` (the *header*
frame of a ZeroMQ message). Fields are only ever appended, with defaults: a header from
an older peer, shorter, takes the defaults of the fields it lacks, and one from a newer
peer, longer, has the fields it does not know ignored. Nothing is pickled: the decoder
takes msgpack's plain types only, checks each field against its declaration, and
refuses anything else with a :class:`~libtorchrt.errors.ProtocolError` whose text says
what was wrong (``malformed Request message: releases must be offsets``).
"""

from __future__ import annotations

import dataclasses
import linecache
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar, overload

import msgpack

from ..errors import ProtocolError

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:  # pragma: no cover - the decorator only informs type checkers

    def dataclass_transform(**_: Any) -> Callable[[Any], Any]:
        return lambda f: f


__all__ = [
    "Anything",
    "Bool",
    "Bytes",
    "Check",
    "Codec",
    "Convert",
    "Int",
    "List",
    "Map",
    "Number",
    "OneOf",
    "Optional",
    "Plain",
    "Str",
    "Struct",
    "message",
    "spec",
    "unpack",
]

#: The refusal of a field, when neither the field nor its check gives one (see spec).
DEFAULT_ERROR = "malformed {cls} message: field {name!r} is {type}"
#: The refusal of a header with fewer fields than the message requires (in the words of
#: the TypeError the hand-written decoders passed on from the dataclass's constructor).
DEFAULT_MISSING = "malformed {cls} message: missing {count} required positional argument{s}: {names}"

_SPEC = "libtorchrt.codec"  # the key of a field's declaration in its metadata


# ------------------------------------------------------------------------------ checks


class _Source:
    """The namespace and the helper functions of the code a Codec writes."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.namespace: dict[str, Any] = {"ProtocolError": ProtocolError, "_new": tuple.__new__}
        self.helpers: list[str] = []
        self._count = 0

    def fresh(self, stem: str) -> str:
        self._count += 1
        return f"_{stem}{self._count}"

    def constant(self, value: Any, stem: str) -> str:
        """A name bound to ``value`` in the generated code's namespace: ``stem`` if that
        is free or already names ``value``, else ``stem`` and a number."""
        name, i = stem, 1
        while name in self.namespace and self.namespace[name] is not value:
            i += 1
            name = f"{stem}_{i}"
        self.namespace[name] = value
        return name

    def literal(self, value: Any) -> str:
        """``value`` as source if it reads back equal, else a name bound to it."""
        if value is None or type(value) in (bool, int, str, bytes):
            return repr(value)
        return self.constant(value, "default")


#: Gives the statement that refuses the value of the field being checked, for a check
#: (the check's own error, or the field's).
Refuse = Callable[["Check"], str]


class Check(ABC):
    """What a field's value must be.

    Args:
        error: the text of the refusal when this check fails, instead of the field's
            (a template, see :func:`spec`).
    """

    def __init__(self, error: str | None = None) -> None:
        self.error = error

    @abstractmethod
    def code(self, var: str, refuse: Refuse, src: _Source) -> list[str]:
        """Lines of Python that check (and may convert) the value in ``var``, running
        ``refuse(check)`` when it is not acceptable."""


class Predicate(Check):
    """A check that reads a value without changing it, written as one expression."""

    @abstractmethod
    def test(self, var: str, src: _Source) -> str:
        """A Python expression that is true exactly when ``var`` is acceptable."""

    def code(self, var: str, refuse: Refuse, src: _Source) -> list[str]:
        return [f"if not ({self.test(var, src)}):", f"    {refuse(self)}"]


class Anything(Predicate):
    """Any msgpack value (the decoder has already refused everything else)."""

    def test(self, var: str, src: _Source) -> str:
        return "True"

    def code(self, var: str, refuse: Refuse, src: _Source) -> list[str]:
        return []


class Int(Predicate):
    """An integer (not a bool) in ``[lo, hi]``, either end optional."""

    def __init__(self, lo: int | None = None, hi: int | None = None, error: str | None = None) -> None:
        super().__init__(error)
        self.lo, self.hi = lo, hi

    def test(self, var: str, src: _Source) -> str:
        # type() rather than isinstance(): a bool is not an acceptable int here
        text = f"type({var}) is int"
        if self.lo is not None:
            text += f" and {var} >= {self.lo}"
        if self.hi is not None:
            text += f" and {var} <= {self.hi}"
        return text


class Bool(Predicate):
    """``true`` or ``false`` (not 0 or 1)."""

    def test(self, var: str, src: _Source) -> str:
        return f"type({var}) is bool"


class Number(Predicate):
    """An integer or a float (not a bool)."""

    def test(self, var: str, src: _Source) -> str:
        return f"(type({var}) is int or type({var}) is float)"


class Str(Predicate):
    """A string of at most ``max_len`` characters."""

    def __init__(self, max_len: int | None = None, error: str | None = None) -> None:
        super().__init__(error)
        self.max_len = max_len

    def test(self, var: str, src: _Source) -> str:
        text = f"type({var}) is str"
        if self.max_len is not None:
            text += f" and len({var}) <= {self.max_len}"
        return text


class Bytes(Predicate):
    """A binary string, of one of ``sizes`` bytes if given."""

    def __init__(self, sizes: Sequence[int] | None = None, error: str | None = None) -> None:
        super().__init__(error)
        self.sizes = None if sizes is None else tuple(sizes)

    def test(self, var: str, src: _Source) -> str:
        text = f"type({var}) is bytes"
        if self.sizes is not None:
            text += f" and len({var}) in {self.sizes!r}"
        return text


class OneOf(Predicate):
    """One of ``values`` (compared with ``==``)."""

    def __init__(self, *values: Any, error: str | None = None) -> None:
        super().__init__(error)
        self.values = values

    def test(self, var: str, src: _Source) -> str:
        return f"{var} in {src.constant(self.values, 'values')}"


class Plain(Predicate):
    """Plain data: None, a bool, int, float or string, or lists of them ``depth`` deep."""

    def __init__(self, depth: int = 2, error: str | None = None) -> None:
        super().__init__(error)
        self.depth = depth

    def test(self, var: str, src: _Source) -> str:
        return f"{src.constant(_plain, 'plain')}({var}, {self.depth})"


def _plain(value: Any, depth: int) -> bool:
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) is list and depth > 0:
        return all(_plain(v, depth - 1) for v in value)
    return False


class Map(Predicate):
    """A map with string keys (msgpack's ``strict_map_key`` already refuses others but
    binary ones), whose values pass ``values`` if given."""

    def __init__(self, values: Predicate | None = None, error: str | None = None) -> None:
        super().__init__(error)
        self.values = values

    def test(self, var: str, src: _Source) -> str:
        if self.values is None:
            return f"type({var}) is dict"
        k, v = src.fresh("k"), src.fresh("v")
        items = f"type({k}) is str and {self.values.test(v, src)} for {k}, {v} in {var}.items()"
        return f"type({var}) is dict and all({items})"


class List(Check):
    """An array of at most ``max_len`` items, each passing ``item``.

    An item check that converts (:class:`Struct`, :class:`Convert`) makes a new list of
    the converted items; it refuses with its own error.
    """

    def __init__(self, item: Check | None = None, max_len: int | None = None, error: str | None = None) -> None:
        super().__init__(error)
        self.item = item
        self.max_len = max_len

    def _shape(self, var: str) -> str:
        text = f"type({var}) is list"
        if self.max_len is not None:
            text += f" and len({var}) <= {self.max_len}"
        return text

    def code(self, var: str, refuse: Refuse, src: _Source) -> list[str]:
        lines = [f"if not ({self._shape(var)}):", f"    {refuse(self)}"]
        item = self.item
        if item is None or isinstance(item, Anything):
            return lines
        x = src.fresh("x")
        if isinstance(item, Predicate):
            # a loop, not all(...): no generator per call on the hot path
            return [*lines, f"for {x} in {var}:", f"    if not ({item.test(x, src)}):", f"        {refuse(self)}"]
        if isinstance(item, Convert) and item.error is None:
            convert = src.constant(item.function, item.function.__name__)
        else:
            convert = _function(item, src)
        return [*lines, f"{var} = [{convert}({x}) for {x} in {var}]"]


class Optional(Check):
    """``nil``, or a value that passes ``checks`` (in order)."""

    def __init__(self, *checks: Check) -> None:
        super().__init__()
        self.checks = checks

    def code(self, var: str, refuse: Refuse, src: _Source) -> list[str]:
        body = [line for c in self.checks for line in c.code(var, refuse, src)]
        return [f"if {var} is not None:", *(f"    {line}" for line in body or ["pass"])]


class Convert(Check):
    """A value made by ``function(value)``, which refuses a value by raising a
    ``ProtocolError`` (its own text) or a ``ValueError`` (then ``error``, or the
    field's).

    For values whose checks and texts are their own, such as tensor descriptors.
    """

    def __init__(self, function: Callable[[Any], Any], error: str | None = None) -> None:
        super().__init__(error)
        self.function = function

    def code(self, var: str, refuse: Refuse, src: _Source) -> list[str]:
        call = f"{var} = {src.constant(self.function, self.function.__name__)}({var})"
        return ["try:", f"    {call}", "except ValueError:", f"    {refuse(self)}"]


class Struct(Check):
    """An array of at least ``len(items)`` values, each passing its item check, made
    into ``cls(*values)`` (``cls`` a NamedTuple; values beyond those are a newer peer's
    and ignored). ``error`` refuses it, whichever value is wrong."""

    def __init__(self, cls: type, *items: Predicate, error: str) -> None:
        super().__init__(error)
        self.cls = cls
        self.items = items

    def code(self, var: str, refuse: Refuse, src: _Source) -> list[str]:
        n = len(self.items)
        tests = [f"type({var}) is list", f"len({var}) >= {n}"]
        tests += [item.test(f"{var}[{i}]", src) for i, item in enumerate(self.items)]
        test = " and ".join(f"({t})" for t in tests)
        make = f"{var} = _new({src.constant(self.cls, self.cls.__name__)}, {var}[:{n}])"
        return [f"if not ({test}):", f"    {refuse(self)}", make]


def _function(check: Check, src: _Source) -> str:
    """The name of ``check`` written as a function of its own (in ``src.helpers``): it
    returns the (converted) value, or raises the check's own error."""
    if check.error is None:
        raise TypeError(f"{type(check).__name__} inside a List needs an error of its own")
    stem = f"read_{check.cls.__name__}" if isinstance(check, Struct) else "check_item"
    name = src.constant(object(), stem)  # (reserved: the def below binds it)
    refusal = src.constant(_Refusal(check.error, "", ""), f"refuse_{name}")
    lines = check.code("v", lambda _: f"raise {refusal}(v) from None", src)
    src.helpers += [f"def {name}(v):", *(f"    {line}" for line in lines), "    return v", ""]
    return name


class _Refusal:
    """Builds the ProtocolError of a refused field from its template."""

    __slots__ = ("cls", "name", "template")

    def __init__(self, template: str, cls: str, name: str) -> None:
        self.template, self.cls, self.name = template, cls, name

    def __call__(self, value: Any) -> ProtocolError:
        text = self.template.format(cls=self.cls, name=self.name, type=type(value).__name__, value=value)
        return ProtocolError(text)


class _Missing:
    """Builds the ProtocolError of a header that lacks required fields."""

    __slots__ = ("cls", "names", "template")

    def __init__(self, template: str, cls: str, names: Sequence[str]) -> None:
        self.template, self.cls, self.names = template, cls, tuple(names)

    def __call__(self, count: int) -> ProtocolError:
        missing = self.names[count - 1 :]  # count: the header's length, KIND included
        quoted = [repr(n) for n in missing]
        names = " and ".join(quoted) if len(quoted) < 3 else ", ".join(quoted[:-1]) + ", and " + quoted[-1]
        text = self.template.format(cls=self.cls, count=len(missing), s="s" if len(missing) > 1 else "", names=names)
        return ProtocolError(text)


# ---------------------------------------------------------------------- declarations


@dataclasses.dataclass(frozen=True)
class _Field:
    """A field's declaration: its checks (in order), its name in refusals, their text."""

    checks: tuple[Check, ...]
    label: str | None
    error: str | None


@dataclasses.dataclass(frozen=True)
class _Options:
    """A message's declaration beyond its fields (see :func:`message`)."""

    missing: str | None
    tail: str | None
    rules: tuple[Callable[[Any], None], ...]


def spec(
    *checks: Check,
    default: Any = dataclasses.MISSING,
    default_factory: Any = dataclasses.MISSING,
    label: str | None = None,
    error: str | None = None,
) -> Any:
    """Declare a field of a :func:`message`: what its value must be, and its default.

    Args:
        checks: what the value must pass, in order (none: anything).
        default, default_factory: as ``dataclasses.field``; a field without either is
            required, which only the first fields of a message may be.
        label: the field's name in refusals (default: its own).
        error: the refusal's text, a ``str.format`` template of ``cls`` (the message's
            class name), ``name`` (the label), ``type`` (the value's type name) and
            ``value``. Default: the codec's (e.g. ``malformed {cls} message: field
            {name!r} is {type}``); a check's own ``error`` comes first.

    Returns:
        A ``dataclasses.field``.
    """
    meta = {_SPEC: _Field(tuple(checks), label, error)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_T = TypeVar("_T")


@overload
@dataclass_transform(field_specifiers=(spec,))
def message(cls: type[_T], /) -> type[_T]: ...


@overload
def message(
    *, missing: str | None = None, tail: str | None = None, rules: Sequence[Callable[[Any], None]] = ()
) -> Callable[[type[_T]], type[_T]]: ...


def message(
    cls: type[_T] | None = None,
    /,
    *,
    missing: str | None = None,
    tail: str | None = None,
    rules: Sequence[Callable[[Any], None]] = (),
) -> type[_T] | Callable[[type[_T]], type[_T]]:
    """Declare a message: a slotted dataclass whose ``KIND`` class variable is its
    number on the wire and whose fields are declared with :func:`spec`.

    Args:
        missing: the refusal of a header without every required field (a template of
            ``cls``, ``count``, ``s`` and ``names``; default: the codec's).
        tail: the first of the fields the encoder leaves out when every field from it
            on holds its default (none: every field is always sent). Only the encoder
            reads it: a decoder takes a header of any length.
        rules: functions that check the decoded message as a whole (e.g. that two lists
            are as long); each raises ``ProtocolError``.
    """

    def wrap(cls: type[_T]) -> type[_T]:
        made = dataclasses.dataclass(slots=True)(cls)
        made.__codec__ = _Options(missing, tail, tuple(rules))  # type: ignore[attr-defined]
        return made

    return wrap if cls is None else wrap(cls)


def _layout(cls: type) -> list[tuple[dataclasses.Field[Any], _Field]]:
    is_message = dataclasses.is_dataclass(cls) and hasattr(cls, "__codec__")
    if not is_message or type(getattr(cls, "KIND", None)) is not int:
        raise TypeError(f"{cls.__name__} is not a message: declare it with @message and a KIND")
    out = []
    for f in dataclasses.fields(cls):
        declared = f.metadata.get(_SPEC)
        if declared is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with spec()")
        out.append((f, declared))
    return out


# ---------------------------------------------------------------------------- codec


def unpack(header: bytes | memoryview) -> list[Any]:
    """A header's msgpack array, its first element an integer (the kind), unchecked
    beyond that.

    Raises:
        ProtocolError: the header is not msgpack, or not such an array.
    """
    try:
        raw = msgpack.unpackb(header, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable header ({type(e).__name__}: {e})") from None
    if type(raw) is not list or not raw or type(raw[0]) is not int:
        raise ProtocolError(f"header must be an array starting with a kind, got {raw!r:.80}")
    return raw


_M = TypeVar("_M")


class Codec(Generic[_M]):
    """The encoder and decoder of a set of messages, written from their declarations.

    Args:
        name: names the generated code (``<codec NAME>`` in tracebacks).
        messages: the :func:`message` classes; the encoder tests them in this order,
            so the ones sent most often come first.
        error: the refusal of a field whose declaration gives none (see :func:`spec`).
        missing: the refusal of a header without every required field.

    Raises:
        TypeError: a class is not a declared message, or two share a ``KIND``.
    """

    def __init__(
        self, name: str, messages: Sequence[type], error: str = DEFAULT_ERROR, missing: str = DEFAULT_MISSING
    ) -> None:
        self.name = name
        self.messages: dict[int, type] = {}
        for cls in messages:
            _layout(cls)
            kind = cls.KIND  # type: ignore[attr-defined]
            if kind in self.messages:
                raise TypeError(f"{cls.__name__} and {self.messages[kind].__name__} are both kind {kind}")
            self.messages[kind] = cls
        src = _Source(f"<codec {name}>")
        lines = _encoder(self.messages.values(), src)
        decoders = {}
        for kind, cls in self.messages.items():
            fn = f"decode_{cls.__name__}"
            lines += ["", *_decoder(fn, cls, error, missing, src)]
            decoders[kind] = fn
        self.source = "\n".join([*src.helpers, *lines, ""])
        linecache.cache[src.filename] = (len(self.source), None, self.source.splitlines(True), src.filename)
        namespace = src.namespace
        exec(compile(self.source, src.filename, "exec"), namespace)
        self.encode: Callable[[_M], bytes] = namespace["encode"]
        self.decoders: Mapping[int, Callable[[list[Any], int], _M]] = {k: namespace[v] for k, v in decoders.items()}
        self.decode: Callable[[bytes | memoryview], _M] = _decode(self.decoders)


def _encoder(messages: Any, src: _Source) -> list[str]:
    lines = [
        "def encode(msg):",
        '    """Encode a message as its header frame (its data frames are sent separately)."""',
        "    t = type(msg)",
    ]
    for cls in messages:
        layout = _layout(cls)
        names = [f.name for f, _ in layout]
        lines.append(f"    if t is {src.constant(cls, cls.__name__)}:")
        tail = cls.__codec__.tail
        if tail is not None:
            start = names.index(tail)
            changed = " or ".join(_not_default(f, src) for f, _ in layout[start:])
            lines += [f"        if not ({changed}):", f"            return {_packb(cls, names[:start], src)}"]
        lines.append(f"        return {_packb(cls, names, src)}")
    lines.append("    raise TypeError(f'not a message of this codec: {t.__name__}')")
    return lines


def _packb(cls: type, names: Sequence[str], src: _Source) -> str:
    items = ", ".join([str(cls.KIND), *(f"msg.{n}" for n in names)])  # type: ignore[attr-defined]
    return f"{src.constant(msgpack.packb, 'packb')}([{items}])"


def _not_default(f: dataclasses.Field[Any], src: _Source) -> str:
    if f.default_factory is not dataclasses.MISSING:
        empty = f.default_factory()
        if empty != type(empty)() or not hasattr(empty, "__len__"):
            raise TypeError(f"the tail field {f.name} must default to an empty collection")
        return f"msg.{f.name}"
    if f.default is dataclasses.MISSING:
        raise TypeError(f"the tail field {f.name} has no default")
    return f"msg.{f.name} != {src.literal(f.default)}"


def _decoder(fn: str, cls: type, error: str, missing: str, src: _Source) -> list[str]:
    layout = _layout(cls)
    options: _Options = cls.__codec__  # type: ignore[attr-defined]
    name = cls.__name__
    klass = src.constant(cls, name)
    required = [f.name for f, _ in layout if f.default is f.default_factory is dataclasses.MISSING]
    kind = cls.KIND  # type: ignore[attr-defined]
    lines = [f"def {fn}(v, n):", f'    """The {name} (kind {kind}) of header array v, of length n."""']
    if required:
        refusal = src.constant(_Missing(options.missing or missing, name, required), f"missing_{name}")
        lines += [f"    if n <= {len(required)}:", f"        raise {refusal}(n)"]
    rules = [src.constant(rule, rule.__name__) for rule in options.rules]
    args: list[str] = []

    def build() -> list[str]:
        made = f"{klass}({', '.join(args)})"
        if not rules:
            return [f"return {made}"]
        return [f"m = {made}", *(f"{rule}(m)" for rule in rules), "return m"]

    for i, (f, declared) in enumerate(layout):
        var = f"f{i}"
        if f.name not in required:
            lines += [f"    if n <= {i + 1}:", *(f"        {line}" for line in build())]
        lines.append(f"    {var} = v[{i + 1}]")
        refuse = _Refuser(src, name, f.name, var, declared.label or f.name, declared.error or error)
        for check in declared.checks:
            lines += [f"    {line}" for line in check.code(var, refuse, src)]
        args.append(var)
    lines += [f"    {line}" for line in build()]
    return lines


class _Refuser:
    """Writes the statement that refuses field ``var`` for a failed check, with the
    check's own error or the field's (one :class:`_Refusal` per distinct text)."""

    def __init__(self, src: _Source, cls: str, field: str, var: str, label: str, error: str) -> None:
        self.src, self.cls, self.field, self.var, self.label, self.error = src, cls, field, var, label, error
        self.names: dict[str, str] = {}

    def __call__(self, check: Check) -> str:
        template = check.error or self.error
        name = self.names.get(template)
        if name is None:
            refusal = _Refusal(template, self.cls, self.label)
            name = self.names[template] = self.src.constant(refusal, f"refuse_{self.cls}_{self.field}")
        return f"raise {name}({self.var}) from None"


def _decode(decoders: Mapping[int, Callable[[list[Any], int], Any]]) -> Callable[[bytes | memoryview], Any]:
    get = decoders.get
    unpackb = msgpack.unpackb

    def decode(header: bytes | memoryview) -> Any:
        """Decode a header frame into its message.

        Raises:
            ProtocolError: the header is not a well-formed message of this protocol.
        """
        # (unpack(), inline: this runs once per message)
        try:
            raw = unpackb(header, raw=False, strict_map_key=True)
        except Exception as e:  # msgpack raises several unrelated types on garbage
            raise ProtocolError(f"undecodable header ({type(e).__name__}: {e})") from None
        if type(raw) is not list or not raw or type(raw[0]) is not int:
            raise ProtocolError(f"header must be an array starting with a kind, got {raw!r:.80}")
        decoder = get(raw[0])
        if decoder is None:
            raise ProtocolError(f"unknown message kind {raw[0]}")
        return decoder(raw, len(raw))

    return decode
