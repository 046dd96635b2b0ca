"""Process-level helpers in mossformer2.utils."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import re
import torch
from mossformer2.utils import keep_freed_memory_for_reuse

def rss_mib():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024

assert keep_freed_memory_for_reuse() is True
before = rss_mib()
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
del x
print(rss_mib() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_keep_freed_memory_for_reuse_keeps_large_frees_in_the_heap():
    # A freed 64 MiB tensor is normally returned to the OS at once (mmap); with the setting it stays mapped, so
    # the next large tensor reuses warm pages instead of faulting in fresh ones.
    kept = float(subprocess.run([sys.executable, "-c", SCRIPT], check=True, capture_output=True,
                                text=True).stdout.strip().splitlines()[-1])
    assert kept > 48
