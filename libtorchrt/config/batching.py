"""Triton's ``dynamic_batching`` block: :class:`DynamicBatching` and :class:`QueuePolicy`.

Runs in the front. The settings are read and checked with Triton's rules
(``model_config_utils.cc``) so that a file Triton refuses is refused here too; the
scheduler that acts on them is not part of this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

__all__ = ["TIMEOUT_ACTIONS", "DynamicBatching", "QueuePolicy"]

#: What happens to a request that waited past its queue timeout (Triton's names).
TIMEOUT_ACTIONS = ("REJECT", "DELAY")


def _count(owner: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{owner} {key} is {value!r}; expected an integer >= 0", key=key)
    return int(value)


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ``ModelQueuePolicy``: how long requests may wait, and how many.

    Args:
        timeout_action: ``"REJECT"`` a request that waited past its timeout, or
            ``"DELAY"`` it behind the others.
        default_timeout_microseconds: queue timeout of a request (0: none).
        allow_timeout_override: a request may set a shorter timeout of its own.
        max_queue_size: requests that may wait (0: no limit).
    """

    timeout_action: str = "REJECT"
    default_timeout_microseconds: int = 0
    allow_timeout_override: bool = False
    max_queue_size: int = 0

    def __post_init__(self) -> None:
        action = str(self.timeout_action).upper()
        if action not in TIMEOUT_ACTIONS:
            raise ConfigError(
                f"queue policy timeout_action {self.timeout_action!r} is not one of {', '.join(TIMEOUT_ACTIONS)}",
                key="timeout_action",
            )
        object.__setattr__(self, "timeout_action", action)
        for key in ("default_timeout_microseconds", "max_queue_size"):
            object.__setattr__(self, key, _count("queue policy", key, getattr(self, key)))
        object.__setattr__(self, "allow_timeout_override", bool(self.allow_timeout_override))


@dataclass(frozen=True)
class DynamicBatching:
    """Triton's ``dynamic_batching``: how requests may be grouped into batches.

    Args:
        preferred_batch_size: batch sizes to aim for (each ``<= max_batch_size``);
            empty: Triton aims for ``max_batch_size``.
        max_queue_delay_microseconds: how long a request may wait for others.
        preserve_ordering: responses leave in the order the requests came.
        priority_levels: number of priority levels (0: no priorities).
        default_priority_level: the level of a request that names none
            (``1..priority_levels`` when there are levels).
        default_queue_policy: the queue policy of every level without its own.
        priority_queue_policy: a queue policy per priority level.

    Raises:
        ConfigError: a value breaks one of Triton's rules (names the field).
    """

    preferred_batch_size: Sequence[int] = ()
    max_queue_delay_microseconds: int = 0
    preserve_ordering: bool = False
    priority_levels: int = 0
    default_priority_level: int = 0
    default_queue_policy: QueuePolicy = field(default_factory=QueuePolicy)
    priority_queue_policy: Mapping[int, QueuePolicy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = tuple(self.preferred_batch_size)
        for size in sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise ConfigError(
                    f"dynamic_batching preferred_batch_size {list(sizes)} must hold positive integers",
                    key="preferred_batch_size",
                )
        object.__setattr__(self, "preferred_batch_size", sizes)
        for key in ("max_queue_delay_microseconds", "priority_levels", "default_priority_level"):
            object.__setattr__(self, key, _count("dynamic_batching", key, getattr(self, key)))
        object.__setattr__(self, "preserve_ordering", bool(self.preserve_ordering))
        policies = {
            _count("dynamic_batching", "priority_queue_policy level", k): v
            for k, v in dict(self.priority_queue_policy).items()
        }
        object.__setattr__(self, "priority_queue_policy", policies)
        levels = self.priority_levels
        if levels:
            if not 1 <= self.default_priority_level <= levels:
                raise ConfigError(
                    f"dynamic_batching default_priority_level is {self.default_priority_level}; "
                    f"expected 1..{levels} (priority_levels is {levels})",
                    key="default_priority_level",
                )
            bad = sorted(k for k in policies if not 1 <= k <= levels)
            if bad:
                raise ConfigError(
                    f"dynamic_batching priority_queue_policy names levels {bad}; expected 1..{levels}",
                    key="priority_queue_policy",
                )
        if self.preserve_ordering:
            if levels > 1:
                raise ConfigError(
                    f"dynamic_batching preserve_ordering allows one priority level; priority_levels is {levels}",
                    key="preserve_ordering",
                )
            for policy in (self.default_queue_policy, *policies.values()):
                if policy.timeout_action == "DELAY" and policy.default_timeout_microseconds:
                    raise ConfigError(
                        "dynamic_batching preserve_ordering cannot be combined with a queue policy that DELAYs "
                        "timed-out requests",
                        key="preserve_ordering",
                    )

    def check(self, model: str, max_batch_size: int) -> None:
        """Check the preferred sizes against the model's ``max_batch_size``.

        Raises:
            ConfigError: a preferred size exceeds ``max_batch_size``.
        """
        over = [s for s in self.preferred_batch_size if s > max_batch_size]
        if over:
            raise ConfigError(
                f"model {model!r}: dynamic_batching preferred_batch_size {over} exceeds max_batch_size "
                f"{max_batch_size}",
                model=model,
                key="preferred_batch_size",
            )
