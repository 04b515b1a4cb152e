"""Where a tensor lies in a pool's shared-memory arenas, read from ``/proc/self/maps``.

:data:`OFFSET` is source text, so that a test's ``model.py`` can run the same function
inside its worker (it is appended to the model's source) while the test runs it in the
front: the same offset on both sides means that nothing was copied between them.
"""

from __future__ import annotations

from typing import Any

#: ``arena_offset(t, model, kind)``: where ``t``'s data lies in this process's mapping of
#: model ``model``'s arena ``kind`` (``"resp"``: a worker's response arena; ``"req"``: the
#: model's request arena), or -1 when it is not there.
OFFSET = """
def arena_offset(t, model, kind="resp"):
    with open("/proc/self/maps") as maps:
        for line in maps:
            if f"memfd:libtorchrt-{model}-" in line and f"-{kind}" in line:
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                if lo <= t.data_ptr() < hi:
                    return t.data_ptr() - lo
    return -1
"""
_helpers: dict[str, Any] = {}
exec(OFFSET, _helpers)
arena_offset = _helpers["arena_offset"]
