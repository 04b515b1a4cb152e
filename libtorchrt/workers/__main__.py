"""``python -m libtorchrt.workers SPEC_JSON``: the worker process (started by the front)."""

from __future__ import annotations

import sys

from .worker import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
