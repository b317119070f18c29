"""Chapter 00 helpers: device choice, seeding, atomic checkpoint writes."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from zer02llm.utils import (atomic_open, atomic_save, get_device, remove_stale_temps, resolve_device,
                            seed_everything)


def test_device_order(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert get_device().type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert get_device().type == "cpu"


def test_seed_everything_repeats():
    seed_everything(3)
    a = (torch.rand(4), __import__("random").random())
    seed_everything(3)
    b = (torch.rand(4), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_atomic_save_roundtrip_and_no_leftovers(tmp_path):
    p = atomic_save({"w": torch.arange(3)}, tmp_path / "sub" / "c.pth")
    assert torch.equal(torch.load(p, weights_only=True)["w"], torch.arange(3))
    assert os.listdir(tmp_path / "sub") == ["c.pth"]


def test_atomic_save_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "c.pth"
    atomic_save({"v": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"v": Unpicklable()}, target)
    assert torch.load(target, weights_only=True) == {"v": 1}
    assert os.listdir(tmp_path) == ["c.pth"]


def test_atomic_files_get_normal_permissions(tmp_path):
    """mkstemp creates 0600 files; a checkpoint or data set must be readable like any other file."""
    mask = os.umask(0o022)
    try:
        p = atomic_save({"v": 1}, tmp_path / "c.pth")
        with atomic_open(tmp_path / "t.txt") as f:
            f.write("héllo\n")
    finally:
        os.umask(mask)
    assert (p.stat().st_mode & 0o777) == 0o644
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"


def test_resolve_device_names_the_available_ones():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None) == get_device()
    with pytest.raises(ValueError, match=r"^unknown device 'tpu': this machine has cpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device 'cuda' is not available here: this machine has cpu"):
            resolve_device("cuda")
    else:
        with pytest.raises(ValueError, match="device 'cuda:99' is not available here"):
            resolve_device("cuda:99")


def test_remove_stale_temps_only_removes_that_files_temporaries(tmp_path):
    mine = [tmp_path / ".c.pth.abc.tmp", tmp_path / ".c.pth.x_1.tmp"]
    others = [tmp_path / ".c.pth2.abc.tmp", tmp_path / ".d.pth.abc.tmp", tmp_path / "c.pth"]
    for path in mine + others:
        path.write_bytes(b"x")
    assert remove_stale_temps(tmp_path / "c.pth") == sorted(mine)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in others)


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys, torch
    from zer02llm.utils import atomic_save
    atomic_save({"w": torch.zeros(10)}, sys.argv[1])  # the previous, small checkpoint
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
    try:
        atomic_save({"w": torch.zeros(100_000)}, sys.argv[1])
    except OSError as e:
        print(e)
""")


def test_atomic_save_says_the_space_ran_out_and_keeps_the_old_file(tmp_path):
    """torch's zip writer turns the failed write into `RuntimeError: [enforce fail ...] unexpected pos`; atomic_save
    finds the OSError behind it. A file-size limit stands in for a full disk (same path through the code)."""
    target = tmp_path / "c.pth"
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(target)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"cannot write {target}: the file is larger than this system allows (File too "
                                  "large); the file that was there before, if any, is intact")
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.zeros(10))
    assert os.listdir(tmp_path) == ["c.pth"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A real full disk: a 1 MiB tmpfs (needs root; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root, or no mount permission)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_gives_one_clear_error(tiny_disk):
    target = tiny_disk / "c.pth"
    atomic_save({"w": torch.zeros(10)}, target)
    with pytest.raises(OSError) as full:
        atomic_save({"w": torch.zeros(1_000_000)}, target)  # 4 MB on a 1 MiB disk
    assert str(full.value) == (f"cannot write {target}: the disk is full (No space left on device); the file that "
                               "was there before, if any, is intact")
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.zeros(10))
    assert os.listdir(tiny_disk) == ["c.pth"]
