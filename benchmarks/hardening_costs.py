"""What the hardening added per request, in the front and in the worker (one process).

Prints the CPU cost of each check a request now passes through: the binder's refusal of
tensors the wire cannot carry (per input), a caller's timeout checked and capped (only
when one is given), and the worker's check of a result against its declared outputs.
The front's whole cost per request is tens of µs (docs/measurements/front_cpu.txt).

    python benchmarks/hardening_costs.py
"""

from __future__ import annotations

import timeit

import torch

from libtorchrt.deadlines import check_timeout
from libtorchrt.transport.wire import MAX_DIMS, MAX_SIZE
from libtorchrt.workers.outputs import DeclaredOutput, check_outputs

N = 200_000


def _us(fn: object) -> float:
    return min(timeit.repeat(fn, number=N, repeat=5)) / N * 1e6  # type: ignore[arg-type]


def main() -> None:
    x = torch.randn(1, 64)

    def wire_shape() -> bool:  # the condition _binding.Binder._check evaluates per tensor
        return x.dim() > MAX_DIMS or (not x.numel() and max(x.shape, default=0) >= MAX_SIZE)

    declared = [DeclaredOutput(0, "OUTPUT__0", "float32", (64,), True)]
    outputs = [torch.randn(1, 64)]
    print(f"binder: wire-shape check, per input tensor      {_us(wire_shape):6.3f} us")
    print(f"front:  check_timeout(30.0), when one is given  {_us(lambda: check_timeout(30.0)):6.3f} us")
    print(f"worker: check_outputs, one declared output      {_us(lambda: check_outputs(outputs, declared)):6.3f} us")


if __name__ == "__main__":
    main()
