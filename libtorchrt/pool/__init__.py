"""``libtorchrt.pool``: the name of ``python -m libtorchrt.pool`` (the server) and of
:class:`~libtorchrt.Pool`'s old import path; the pool itself lives in ``front/pool.py``."""

from ..front.pool import Pool

__all__ = ["Pool"]
