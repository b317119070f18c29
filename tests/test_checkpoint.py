"""Checkpoint files (zer02llm.checkpoint): round trip, extra keys, tied weights, and clear errors."""
import pytest
import torch

from zer02llm.checkpoint import read_checkpoint
from zer02llm.model import LLM

from tiny_models import ids, tiny


def test_checkpoint_round_trip(tmp_path):
    m = tiny(use_moe=True, tie_word_embeddings=False)
    path = m.save_checkpoint(tmp_path / "sub" / "ckpt.pth")
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pth"]  # atomic: no temporary file left behind
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"config", "model"} and raw["config"] == m.config.to_dict()
    again = LLM.from_checkpoint(path)
    x = ids(2, 8)
    with torch.no_grad():
        assert torch.equal(again(x).logits, m(x).logits)
    fresh = tiny(seed=9, use_moe=True, tie_word_embeddings=False, dropout=0.1, max_seq_len=32)  # runtime fields may differ
    fresh.load_checkpoint(path)
    assert torch.equal(fresh.eval()(x).logits, m(x).logits)


def test_checkpoint_with_extra_keys_and_tied_weights(tmp_path):
    m = tiny()
    torch.save({"config": m.config.to_dict(), "model": m.state_dict(), "step": 10, "optimizer": {}}, tmp_path / "c.pth")
    again = LLM.from_checkpoint(tmp_path / "c.pth")
    assert again.lm_head.weight is again.embed_tokens.weight
    assert read_checkpoint(tmp_path / "c.pth")["step"] == 10


def test_checkpoint_errors(tmp_path):
    m = tiny()
    good = m.save_checkpoint(tmp_path / "good.pth")
    with pytest.raises(ValueError, match=r"different architecture \(n_layers: model 3, checkpoint 2\)"):
        tiny(n_layers=3).load_checkpoint(good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        LLM.from_checkpoint(truncated)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        LLM.from_checkpoint(tmp_path / "missing.pth")
    torch.save(m.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="not a zer02llm checkpoint"):
        LLM.from_checkpoint(tmp_path / "bare.pth")
    torch.save({"config": {**m.config.to_dict(), "n_head": 4}, "model": m.state_dict()}, tmp_path / "badcfg.pth")
    with pytest.raises(ValueError, match="stored config is invalid"):
        LLM.from_checkpoint(tmp_path / "badcfg.pth")
    sd = m.state_dict()
    sd.pop("norm.weight")
    torch.save({"config": m.config.to_dict(), "model": sd}, tmp_path / "missing_key.pth")
    with pytest.raises(ValueError, match="weights do not fit"):
        LLM.from_checkpoint(tmp_path / "missing_key.pth")


