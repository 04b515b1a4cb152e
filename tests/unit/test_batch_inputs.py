"""A batch's inputs as the worker assembles them (``workers/batching.gather``), from
headers that went through the real wire encoding: the front's joined form (one blob per
input holding every request's rows) and the per-request form, and the malformed ones a
hostile peer could send."""

from __future__ import annotations

import pytest
import torch

from libtorchrt.errors import ProtocolError
from libtorchrt.transport import tensors as tensor_io
from libtorchrt.transport import wire
from libtorchrt.transport.wire import BLOB, TensorDesc
from libtorchrt.workers.batching import gather


def _through_the_wire(descs: list[TensorDesc], blobs: list[bytes], rows: list[int]) -> wire.Request:
    msg = wire.decode(wire.encode(wire.Request(1, descs, [], blobs, batch=rows)))
    assert isinstance(msg, wire.Request)
    return msg


def _gather(msg: wire.Request) -> list[torch.Tensor]:
    return gather(msg.tensors, msg.batch, msg.blobs, [], lambda d: pytest.fail("no arena here"))


def test_a_joined_input_is_read_as_one_tensor_of_every_row() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)  # request 0: row 0; request 1: rows 1-2
    y = torch.arange(6, dtype=torch.int64).reshape(3, 2)
    descs = [TensorDesc("float32", (3, 4), BLOB, 0), TensorDesc("int64", (3, 2), BLOB, 1)]
    blobs = [x.numpy().tobytes(), y.numpy().tobytes()]
    got = _gather(_through_the_wire(descs, blobs, [1, 2]))
    assert len(got) == 2 and torch.equal(got[0], x) and torch.equal(got[1], y)
    got[0][0, 0] = 99.0  # the worker's own copy: the model may write to it


def test_per_request_inputs_are_joined_by_the_worker() -> None:
    parts = [torch.full((n, 4), float(i)) for i, n in enumerate([1, 2, 1])]
    placed = [tensor_io.write([p], None, None, 1 << 16) for p in parts]
    descs = [TensorDesc(d.dtype, d.shape, d.kind, i) for i, pl in enumerate(placed) for d in pl.descs]
    blobs = [b for pl in placed for b in pl.blobs]
    (got,) = _gather(_through_the_wire(descs, blobs, [1, 2, 1]))
    assert torch.equal(got, torch.cat(parts))


@pytest.mark.parametrize(
    "descs, why",
    [
        # the first input holds every row, the second only the first request's
        ([TensorDesc("float32", (3, 4), BLOB, 0), TensorDesc("float32", (1, 4), BLOB, 1)], "joined input"),
        # a joined string input: strings are never batched
        ([TensorDesc("string", (3,), BLOB, 0)], "joined input"),
        # a joined input whose blob is not the size its shape says
        ([TensorDesc("float32", (3, 8), BLOB, 0)], "blob"),
    ],
    ids=["rows-disagree", "strings", "wrong-size"],
)
def test_a_malformed_joined_batch_is_a_protocol_error(descs: list[TensorDesc], why: str) -> None:
    blobs = [bytes(48), bytes(16)]
    with pytest.raises(ProtocolError, match=why):
        _gather(_through_the_wire(descs, blobs, [1, 2]))
