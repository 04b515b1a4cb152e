"""A batch's outputs split back by member rows (``_batch._Outputs``): the shared split,
and a member's own views when another thread is splitting (it never waits)."""

from __future__ import annotations

import numpy as np
import torch

from libtorchrt.front.batch import _Outputs


def _batch_outputs() -> _Outputs:
    rows = [1, 3, 2]
    out = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    ids = np.arange(6, dtype=np.int64)
    return _Outputs({"y": out, "id": ids, "text": ["a", "b", "c", "d", "e", "f"]}, rows, None)


def _expect(i: int) -> tuple[list[int], list[str]]:
    start = [0, 1, 4][i]
    n = [1, 3, 2][i]
    return list(range(start, start + n)), list("abcdef"[start : start + n])


def test_each_member_gets_its_own_rows_from_one_split() -> None:
    shared = _batch_outputs()
    got = [shared.member(i) for i in range(3)]
    for i, result in enumerate(got):
        ids, text = _expect(i)
        assert result["id"].tolist() == ids and result["text"] == text
        assert torch.equal(result["y"], torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)[ids[0] : ids[-1] + 1])
    # one storage: views of the batch's array, no copies
    assert got[1]["y"].data_ptr() - got[0]["y"].data_ptr() == 1 * 4 * 4
    assert shared.parts is not None and all(v is None for values in shared.parts.values() for v in values)


def test_a_member_does_not_wait_for_another_threads_split() -> None:
    shared = _batch_outputs()
    assert shared.lock.acquire(False)  # another thread is splitting
    try:
        own = shared.member(1)  # returns at once, with views of its own
    finally:
        shared.lock.release()
    assert own["id"].tolist() == [1, 2, 3] and own["text"] == ["b", "c", "d"]
    assert shared.parts is None
    assert shared.member(2)["id"].tolist() == [4, 5]  # the split, later
    assert shared.parts is not None and shared.parts["id"][0] is not None  # member 0 not read yet


def test_without_a_shared_reader_each_member_makes_its_own_views() -> None:
    """Members read by caller threads (no event loop reads them all): no split, each
    member gets views of its own rows, still of the batch's memory."""
    rows = [2, 1, 3]
    out = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    shared = _Outputs({"y": out, "text": list("abcdef")}, rows, None, split=False)
    got = [shared.member(i) for i in (2, 0, 1)]
    assert [g["text"] for g in got] == [["d", "e", "f"], ["a", "b"], ["c"]]
    assert got[0]["y"][:, 0].tolist() == [12.0, 16.0, 20.0]
    assert got[1]["y"].data_ptr() == out.ctypes.data  # a view, not a copy
    assert shared.parts is None  # never split
