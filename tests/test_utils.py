"""Chapter 00 helpers: device choice, seeding, atomic checkpoint writes."""
import os

import pytest
import torch

from zer02llm.utils import atomic_open, atomic_save, get_device, seed_everything


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
