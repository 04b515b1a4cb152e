"""Where each field of a ``config.pbtxt`` is: :class:`Locations` (runs in the front).

protobuf's Python ``text_format`` keeps no positions, so an error about a field
found *after* parsing (a value out of range, a field libtorchrt refuses) could only
name the file. This module tokenizes the text once more and records the line of
every field by its path in the message: ``("input", 1, "dims")`` is the ``dims`` of
the second input, however the file spells it (``input [ {...}, {...} ]`` or two
``input { }`` blocks, ``key: value`` or ``key { }``). Map entries are also found by
their key: ``("parameters", "INFERENCE_MODE")``.

It runs only on text that ``text_format`` already accepted, so it can be lenient:
anything it does not understand just has no line.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator

__all__ = ["Locations", "Path"]

#: A field's path: field names, with the index of repeated entries (or a map key).
Path = tuple[str | int, ...]

_TOKEN = re.compile(
    r"""(?P<skip>\s+|\#[^\n]*)
      | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
      | (?P<word>[A-Za-z0-9_.+\-]+)
      | (?P<punct>[{}\[\]<>:,;/])""",
    re.VERBOSE,
)
_CLOSE = {"{": "}", "<": ">"}


class _Tokens:
    def __init__(self, text: str) -> None:
        self.items: list[tuple[str, str, int]] = []  # (kind, text, line)
        line, pos = 1, 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                raise ValueError(f"unexpected character at line {line}")
            kind = m.lastgroup or "skip"
            if kind != "skip":
                self.items.append((kind, m.group(), line))
            line += m.group().count("\n")
            pos = m.end()
        self.i = 0

    def peek(self) -> str:
        return self.items[self.i][1] if self.i < len(self.items) else ""

    def take(self) -> tuple[str, str, int]:
        item = self.items[self.i]
        self.i += 1
        return item

    def accept(self, text: str) -> bool:
        if self.peek() == text:
            self.i += 1
            return True
        return False


class Locations:
    """The line of every field of a configuration text, by path.

    Args:
        text: configuration text that protobuf's ``text_format`` parsed.
    """

    def __init__(self, text: str) -> None:
        self._lines: dict[Path, int] = {}
        try:
            tokens = _Tokens(text)
            self._message(tokens, (), "")
        except (ValueError, IndexError):  # lenient by design: keep what was found
            pass

    def line(self, *path: str | int) -> int | None:
        """The line of ``path``, else of its closest enclosing field found; None if none.

        A singular field's path may leave out the index 0 that its entry has in the
        text: ``("dynamic_batching", "preferred_batch_size")``.
        """
        p: Path = tuple(path)
        while p:
            for candidate in (p, _stripped(p)):
                if candidate in self._lines:
                    return self._lines[candidate]
            p = p[:-1]
        return None

    def __iter__(self) -> Iterator[Path]:
        return iter(self._lines)

    def _record(self, path: Path, line: int) -> None:
        self._lines.setdefault(path, line)
        # Also without the 0 indices: the path of a singular field (no index in
        # protobuf) or of a repeated field's first entry.
        self._lines.setdefault(_stripped(path), line)

    def _message(self, t: _Tokens, path: Path, end: str) -> str | None:
        """Read fields up to ``end``; return the value of a ``key`` field (map entries)."""
        counts: dict[str, int] = defaultdict(int)
        key: str | None = None
        while t.peek() != end:
            if t.accept("["):  # an extension or Any type name: skip to its ']'
                while t.take()[1] != "]":
                    pass
                name, line = "[ext]", t.items[t.i - 1][2]
            else:
                _, name, line = t.take()
            t.accept(":")
            self._record((*path, name), line)
            if t.accept("["):
                while not t.accept("]"):
                    index = counts[name]
                    counts[name] += 1
                    value = self._value(t, (*path, name, index), t.items[t.i][2])
                    if value is not None and name == "key":
                        key = value
                    t.accept(",")
            else:
                index = counts[name]
                counts[name] += 1
                value = self._value(t, (*path, name, index), line)
                if value is not None and name == "key":
                    key = value
            if not t.accept(","):
                t.accept(";")
        return key

    def _value(self, t: _Tokens, path: Path, line: int) -> str | None:
        """Read one value; return a scalar's text (unquoted), None for a message."""
        self._record(path, line)
        opening = t.peek()
        if opening in _CLOSE:
            t.take()
            key = self._message(t, path, _CLOSE[opening])
            t.take()  # the closing brace
            if key is not None:  # a map entry: also findable by its key, with its fields
                alias = (*path[:-1], key)
                n = len(path)
                inner = [(p, at) for p, at in self._lines.items() if p[:n] == path]
                self._record(alias, line)
                for p, at in inner:
                    self._record(alias + p[n:], at)
            return None
        kind, text, _ = t.take()
        if kind == "string":
            while t.i < len(t.items) and t.items[t.i][0] == "string":  # "a" "b" concatenates
                text = text[:-1] + t.take()[1][1:]
            return text[1:-1]
        return text


def _stripped(path: Path) -> Path:
    return tuple(p for p in path if not (isinstance(p, int) and p == 0))
