"""The C loops of pass-through sharding (shards/_native.c), or None where they were not built.

`loops` is the compiled module; plan._scan_part and writer._read_images use it when it is there and
do the same work in Python when it is not (or when VITPIPE_NATIVE=0, for comparing the two).
"""
from __future__ import annotations

import os

try:
    from shards import _native as loops
except ImportError:  # installed without a C compiler
    loops = None

BUILT = loops is not None  # (whether or not VITPIPE_NATIVE=0 turns them off)
if os.environ.get("VITPIPE_NATIVE", "1") == "0":
    loops = None
