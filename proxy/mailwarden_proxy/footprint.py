"""Process-wide memory settings of the proxy process, applied once by the CLI at start.

A sidecar runs next to every mail-sending pod, so its resident size is multiplied by
the number of pods; bench/README.md has the figures each setting bought.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

# requests (pulled in by msal) imports charset_normalizer to guess the encoding of text
# bodies without a charset. The proxy only ever reads JSON from token endpoints, which
# requests decodes without it (RFC 8259 is UTF-8; requests falls back to UTF-8 when no
# detector is installed). Importing it costs 3.6 MB of RSS: its mypyc-compiled module
# and the 91 codecs it loads.
_UNUSED_BY_THE_PROXY = ("charset_normalizer", "chardet")

# uvloop gives every TLS connection a 256 KiB read buffer. glibc serves allocations that
# large with mmap only until the first one is freed, then raises its threshold and takes
# them from the heap, where pages once touched by any allocation stay resident. A fixed
# threshold keeps each buffer in its own mapping, of which an idle session touched only
# the pages its handshake and login were read into. Smaller allocations are unaffected,
# and reads don't allocate 256 KiB per chunk (`relay.reading`).
M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value


def apply() -> None:
    """Keep the modules the proxy never needs out of this process.

    Only for the proxy's own process: a library must not make this choice for its host.
    """
    for name in _UNUSED_BY_THE_PROXY:
        if name not in sys.modules:  # None there makes `import name` raise ImportError
            sys.modules[name] = None  # type: ignore[assignment]
    warnings.filterwarnings(
        "ignore", message="Unable to find acceptable character detection dependency"
    )
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # whoever set glibc's variable decides
        _fix_mmap_threshold()


def _fix_mmap_threshold() -> None:
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: its allocator has no such threshold
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
