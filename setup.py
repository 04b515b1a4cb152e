"""Build of the native modules (``libtorchrt/transport/_lanes.c``, the front's fast lane, and
``_outheap.c``, the workers' outputs made in place); everything else is declared in
pyproject.toml. A C compiler is needed at install on Linux."""

import sys

from setuptools import Extension, setup

FLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
NATIVE = [
    Extension("libtorchrt.transport._lanes", ["libtorchrt/transport/_lanes.c"], extra_compile_args=FLAGS),
    Extension("libtorchrt.transport._outheap", ["libtorchrt/transport/_outheap.c"], extra_compile_args=FLAGS),
]

setup(ext_modules=NATIVE if sys.platform.startswith("linux") else [])
