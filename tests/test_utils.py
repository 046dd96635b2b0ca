"""Helpers in mossformer2.utils: atomic writes, process-level memory settings."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from mossformer2.utils import atomic_path, atomic_write_text

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


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_atomic_writes_get_the_mode_of_a_plain_write_not_the_private_temp_mode(tmp_path):
    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "new.txt", "x")
        (tmp_path / "plain.txt").write_text("x")
        mode = stat.S_IMODE((tmp_path / "new.txt").stat().st_mode)
        assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o644
        # Replacing a file keeps that file's mode.
        os.chmod(tmp_path / "new.txt", 0o640)
        atomic_write_text(tmp_path / "new.txt", "y")
        assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o640
        assert (tmp_path / "new.txt").read_text() == "y"
    finally:
        os.umask(mask)


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path):
    (tmp_path / "kept.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "kept.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert (tmp_path / "kept.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt"]
