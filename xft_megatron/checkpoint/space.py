"""Disk space: what is free where a checkpoint goes, and how much a checkpoint folder holds.

Used before a run starts (training/disk.py refuses a run whose first checkpoint cannot fit)
and in the message of a save that failed (the free space is named, so "disk full" is not a
guess).
"""

import os
import shutil


def free_bytes(path: str) -> int:
    """Bytes free to this user on the file system that holds `path` (or would hold it: the
    nearest existing folder above it is asked)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return shutil.disk_usage(probe).free


def folder_bytes(folder: str) -> int:
    """Bytes of the files under `folder` (links not followed)."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:  # removed while walking (a concurrent clean-up)
                pass
    return total


def human(n: float) -> str:
    """1536 -> '1.5 KiB', 3.2e9 -> '3.0 GiB' (GiB is the largest unit used)."""
    units = ("B", "KiB", "MiB", "GiB")
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:,.0f} B" if i == 0 else f"{n:,.1f} {units[i]}"
