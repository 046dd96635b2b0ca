"""Helpers in mossformer2.utils: atomic writes, process-level memory settings."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mossformer2.utils import atomic_path, atomic_paths, atomic_write_text

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


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="Linux /proc")
def test_the_umask_is_read_without_setting_it(monkeypatch):
    """Setting the umask to read it left a moment in which another thread's new file got mode 0666."""
    from mossformer2.utils import _umask

    mask = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda value: pytest.fail("os.umask was called"))
        assert _umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(mask)


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


def test_atomic_paths_replace_all_targets_or_none(tmp_path, monkeypatch):
    """A failure while renaming (here the second rename) puts the first target back: s1 and s2 never hold
    outputs of different runs."""
    s1, s2 = tmp_path / "x_s1.wav", tmp_path / "x_s2.wav"
    s1.write_text("old 1")
    real_replace = os.replace
    onto_targets = []

    def fail_on_second_target(src, dst):
        if os.fspath(dst) in (os.fspath(s1), os.fspath(s2)):
            onto_targets.append(dst)
            if len(onto_targets) == 2:
                raise KeyboardInterrupt  # Ctrl-C between the two renames, whichever comes first
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_second_target)
    with pytest.raises(KeyboardInterrupt), atomic_paths([s1, s2]) as temps:
        for tmp, text in zip(temps, ("new 1", "new 2")):
            tmp.write_text(text)
    assert s1.read_text() == "old 1" and not s2.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_s1.wav"]  # no temp or backup left
    monkeypatch.setattr(os, "replace", real_replace)
    with atomic_paths([s1, s2]) as temps:
        for tmp, text in zip(temps, ("new 1", "new 2")):
            tmp.write_text(text)
    assert (s1.read_text(), s2.read_text()) == ("new 1", "new 2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_s1.wav", "x_s2.wav"]


def test_atomic_paths_interrupt_right_after_an_old_file_moved_aside_restores_it(tmp_path, monkeypatch):
    """Ctrl-C can land between any two steps: here just after s2's old file moved aside, before the new one
    arrives. Both old files come back, and no hidden backup is left holding one of them."""
    s1, s2 = tmp_path / "x_s1.wav", tmp_path / "x_s2.wav"
    s1.write_text("old 1")
    s2.write_text("old 2")
    real_replace = os.replace

    def interrupt_after_moving_s2_aside(src, dst):
        real_replace(src, dst)
        if os.fspath(src) == os.fspath(s2) and os.fspath(dst).endswith(".bak"):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupt_after_moving_s2_aside)
    with pytest.raises(KeyboardInterrupt), atomic_paths([s1, s2]) as temps:
        for tmp, text in zip(temps, ("new 1", "new 2")):
            tmp.write_text(text)
    assert (s1.read_text(), s2.read_text()) == ("old 1", "old 2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_s1.wav", "x_s2.wav"]


def test_atomic_paths_refuse_a_folder_target_before_replacing_anything(tmp_path):
    s1, s2 = tmp_path / "x_s1.wav", tmp_path / "x_s2.wav"
    s1.mkdir()
    s2.write_text("old 2")
    with pytest.raises(IsADirectoryError, match="x_s1.wav"), atomic_paths([s1, s2]) as temps:
        for tmp in temps:
            tmp.write_text("new")
    assert s2.read_text() == "old 2" and s1.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_s1.wav", "x_s2.wav"]


def test_auto_device_is_read_the_same_everywhere():
    """`--device AUTO` chose a device for ONNX models but was an unknown device for torch ones."""
    import torch

    from mossformer2.runtime import providers_for_device
    from mossformer2.utils import is_auto_device, resolve_device

    assert all(is_auto_device(name) for name in (None, "auto", "AUTO", " Auto "))
    assert not any(is_auto_device(name) for name in ("cpu", "cuda", "autos"))
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("AUTO") == resolve_device(" auto ") == expected
    cpu_only = ["CPUExecutionProvider"]
    assert providers_for_device("AUTO", cpu_only) == providers_for_device("auto", cpu_only) == cpu_only


def test_devices_other_than_cpu_and_present_cuda_ones_are_refused_in_words(monkeypatch):
    """`--device mps` ended in PyTorch's traceback, and `cuda:N` past the last GPU failed later, unclearly."""
    import torch

    from mossformer2.utils import resolve_device

    for name in ("mps", "xpu:0", "meta"):
        with pytest.raises(ValueError, match=f"^device '{name}' is not supported: use 'auto', 'cpu', 'cuda'"):
            resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"^device 'cuda:2' requested but this machine has 2 CUDA devices "
                                         r"\(cuda:0 to cuda:1\)$"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"has 1 CUDA device \(cuda:0\)$"):
        resolve_device(torch.device("cuda", 1))


def test_an_unwritable_folder_is_named_read_only_or_permission_denied(tmp_path, monkeypatch):
    """A read-only mount (a mounted image, a read-only share) was reported as "permission denied"."""
    from types import SimpleNamespace

    from mossformer2.utils import check_folder_creatable

    monkeypatch.setattr(os, "access", lambda *_args, **_kwargs: False)
    with pytest.raises(OSError, match=r"cannot create the output folder .*new: permission denied$"):
        check_folder_creatable(tmp_path / "new", "output folder")
    monkeypatch.setattr(os, "statvfs", lambda _path: SimpleNamespace(f_flag=os.ST_RDONLY))
    with pytest.raises(OSError, match=r"cannot write into the output folder .*: Read-only file system$"):
        check_folder_creatable(tmp_path, "output folder")
