"""Model versions in a repository: :class:`VersionPolicy` and the version directories.

Runs in the front. As in Triton, a version is a sub-directory of the model's
directory named by a number that does not start with ``0`` (``1``, ``2``, ``10``;
not ``0``, ``01``, ``v2`` or ``latest``), and the model's ``version_policy`` picks
which of them are served.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

__all__ = ["POLICY_KINDS", "VersionPolicy", "version_dirs"]

#: The kinds of version policy (Triton's ``version_policy`` oneof).
POLICY_KINDS = ("latest", "all", "specific")
_VERSION_RE = re.compile(r"[1-9][0-9]*")


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model are served (Triton's ``version_policy``).

    Args:
        kind: ``"latest"`` (the ``num_versions`` highest), ``"all"``, or
            ``"specific"`` (the ``versions`` listed).
        num_versions: for ``"latest"``: how many (>= 1).
        versions: for ``"specific"``: which (each >= 1).

    The default, as in Triton, is the latest one.

    Raises:
        ConfigError: an unknown kind, or numbers that do not fit it.
    """

    kind: str = "latest"
    num_versions: int = 1
    versions: Sequence[int] = ()

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ConfigError(
                f"version_policy {self.kind!r} is not one of {', '.join(POLICY_KINDS)}", key="version_policy"
            )
        n = self.num_versions
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(
                f"version_policy latest num_versions is {n!r}; expected an integer >= 1", key="num_versions"
            )
        versions = tuple(sorted(set(self.versions)))
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in versions):
            raise ConfigError(
                f"version_policy specific versions {list(self.versions)} must be integers >= 1", key="versions"
            )
        if self.kind == "specific" and not versions:
            raise ConfigError("version_policy specific lists no versions", key="versions")
        if self.kind != "specific" and versions:
            raise ConfigError(f"version_policy {self.kind} does not take a list of versions", key="version_policy")
        if self.kind != "latest" and n != 1:
            raise ConfigError(f"version_policy {self.kind} does not take num_versions", key="version_policy")
        object.__setattr__(self, "versions", versions)

    def select(self, available: Iterable[int]) -> list[int]:
        """The versions of ``available`` to serve, in ascending order."""
        have = sorted(set(available))
        if self.kind == "all":
            return have
        if self.kind == "latest":
            return have[-self.num_versions :]
        return [v for v in have if v in self.versions]

    def missing(self, available: Iterable[int]) -> list[int]:
        """The versions a ``"specific"`` policy asks for that ``available`` lacks."""
        have = set(available)
        return [v for v in self.versions if v not in have] if self.kind == "specific" else []


def version_dirs(model_dir: str | Path) -> dict[int, Path]:
    """The version directories of a model directory, by version number.

    Directories whose name is not a number, or starts with ``0``, are not versions
    (Triton ignores them too); neither are files.
    """
    root = Path(model_dir)
    return {int(p.name): p for p in root.iterdir() if _VERSION_RE.fullmatch(p.name) and p.is_dir()}
