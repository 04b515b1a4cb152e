"""``python -m libtorchrt.pool``: the pool server (``libtorchrt/server/cli.py``)."""

from libtorchrt.server.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
