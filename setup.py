"""Build of the native fast lane (``libtorchrt/transport/_lanes.c``); everything else is
declared in pyproject.toml. A C compiler is needed at install on Linux."""

import sys

from setuptools import Extension, setup

LANES = Extension(
    "libtorchrt.transport._lanes",
    ["libtorchrt/transport/_lanes.c"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
)

setup(ext_modules=[LANES] if sys.platform.startswith("linux") else [])
