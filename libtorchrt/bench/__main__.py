"""Entry point of ``python -m libtorchrt.bench`` (runs in the bench process); see cli.py."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
