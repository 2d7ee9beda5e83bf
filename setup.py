"""The one compiled part: shards/_native.c, the per-image loops of pass-through sharding. Optional:
where it does not build (no C compiler), shards runs the same work in Python (shards/native.py)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("shards._native", ["shards/_native.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"])])
