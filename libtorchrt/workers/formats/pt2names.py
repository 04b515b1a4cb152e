"""Names of a PyTorch 2 model's inputs and outputs, from its call specification
(worker process).

``torch.export`` flattens a call's ``(args, kwargs)`` and its result into leaves with
``torch.utils._pytree``; the tree specs say where each leaf sits. Triton's PyTorch
backend names the leaves by that place, and so does libtorchrt:

- inputs: ``ARGS[0]``, ``ARGS[2][key]``, ``KWARGS[mask]``;
- outputs: ``RESULT`` (one tensor), ``RESULT[0]``, ``RESULT[logits]``, ``RESULT[1][key]``;
- ordinal names, ``INPUT__<i>`` and ``OUTPUT__<i>`` (any ``<prefix>__<i>``), name the
  i-th leaf in flattening order.

:func:`resolve` maps a configuration's declared names onto the leaves and refuses a
name that is neither, listing the ones that exist.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .runner import LoadError

__all__ = ["input_paths", "leaf_paths", "output_paths", "resolve"]

_ORDINAL = re.compile(r"^.+__(\d+)$")


def leaf_paths(spec: Any, root: str) -> list[str]:
    """The path of every leaf of the pytree ``spec`` under ``root``, in flattening order."""
    if spec.is_leaf():
        return [root]
    keys = _child_keys(spec)
    out: list[str] = []
    for key, child in zip(keys, spec.children()):
        out.extend(leaf_paths(child, f"{root}[{key}]"))
    return out


def _child_keys(spec: Any) -> list[str]:
    context = spec.context
    n = spec.num_children
    if isinstance(context, (list, tuple)) and len(context) == n and all(isinstance(k, (str, int)) for k in context):
        return [str(k) for k in context]  # dict keys (and like containers)
    return [str(i) for i in range(n)]  # tuple, list, namedtuple: positions


def input_paths(in_spec: Any) -> list[str]:
    """Input leaf names of a call spec's ``in_spec`` (a tuple of ``(args, kwargs)``)."""
    if in_spec.is_leaf() or in_spec.num_children != 2:
        return leaf_paths(in_spec, "ARGS")
    args, kwargs = in_spec.children()
    return leaf_paths(args, "ARGS") + leaf_paths(kwargs, "KWARGS")


def output_paths(out_spec: Any) -> list[str]:
    """Output leaf names of a call spec's ``out_spec``."""
    return leaf_paths(out_spec, "RESULT")


def resolve(declared: Sequence[str], paths: Sequence[str], kind: str, model: str) -> list[int]:
    """The leaf index of each declared name: a path, or ``<prefix>__<i>``.

    Raises:
        LoadError: a name that is neither a leaf's path nor a leaf's ordinal, or two
            names for one leaf.
    """
    index = {p: i for i, p in enumerate(paths)}
    out: list[int] = []
    for name in declared:
        i = index.get(name)
        if i is None:
            m = _ORDINAL.match(name)
            if m is not None and int(m.group(1)) < len(paths):
                i = int(m.group(1))
        if i is None:
            raise LoadError(
                f"model {model!r}: {kind} {name!r} is not in the model's call specification; its {kind}s are "
                f"{list(paths)} (or {kind.upper()}__0..{kind.upper()}__{len(paths) - 1} by position)"
            )
        if i in out:
            raise LoadError(f"model {model!r}: two declared {kind}s name {paths[i]!r}")
        out.append(i)
    return out
