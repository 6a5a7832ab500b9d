"""Process-wide allocator settings the command-line entry points choose for themselves
(library code never changes them): the streaming tools hold tensors of known sizes layer
after layer, and glibc's defaults suit neither of their patterns.
"""

import ctypes


def reuse_freed_memory() -> None:
    """For `xft upcycle` and `xft merge`: glibc serves large allocations from its heap instead of
    fresh mappings, so each layer's expert buffers (hundreds of MB, the same sizes layer after
    layer) reuse the pages the previous layer freed rather than faulting in new ones. Costs some
    resident memory (freed pages are kept). No effect off glibc."""
    _mallopt((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30))


def release_freed_memory() -> None:
    """For `xft convert`, whose tensors are of many sizes: every allocation above 1 MiB gets its
    own mapping, returned to the system when freed, so resident memory follows what is held now
    (glibc otherwise raises this threshold to the largest block freed so far and keeps such
    blocks on its heap). No effect off glibc."""
    _mallopt((_M_MMAP_THRESHOLD, 1 << 20))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def _mallopt(*settings) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    for option, value in settings:
        libc.mallopt(option, value)
