"""LLMconfig: defaults, validation messages, dict/JSON round trip."""
import dataclasses
import json

import pytest

from zer02llm.config import LLMconfig


def test_defaults_are_minimind_sized():
    c = LLMconfig()
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.max_seq_len) == (6400, 512, 8, 8, 2, 512)
    assert c.head_dim == 64 and c.tie_word_embeddings and not c.use_moe
    assert c.rope_theta == 1e6 and c.norm_eps == 1e-6


def test_quick_start_config():
    c = LLMconfig(vocab_size=32000, dim=512, n_layers=6, n_heads=8, max_seq_len=2048)
    assert c.n_kv_heads == 2 and c.head_dim == 64


def test_n_kv_heads_none_means_multi_head():
    assert LLMconfig(n_heads=4, dim=256, n_kv_heads=None).n_kv_heads == 4


def test_floats_are_normalised():
    c = LLMconfig(rope_theta=10000)
    assert isinstance(c.rope_theta, float) and c.rope_theta == 10000.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=500), r"dim \(500\) must be divisible by n_heads \(8\).*\[496, 504\]"),
        (dict(n_kv_heads=3), r"n_kv_heads in \[1, 2, 4, 8\]"),
        (dict(dim=72, n_heads=8, n_kv_heads=2), r"head_dim .* = 9 is odd"),
        (dict(num_experts_per_tok=5, n_routed_experts=4), r"num_experts_per_tok \(5\) cannot exceed n_routed_experts \(4\)"),
        (dict(vocab_size=0), r"vocab_size must be positive"),
        (dict(n_layers=-1), r"n_layers must be positive"),
        (dict(max_seq_len=0), r"max_seq_len must be positive"),
        (dict(hidden_dim=0), r"hidden_dim must be positive"),
        (dict(n_shared_experts=-1), r"n_shared_experts must be >= 0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
        (dict(rope_theta=0), r"rope_theta must be positive"),
        (dict(norm_eps=0.0), r"norm_eps must be positive"),
        (dict(aux_loss_alpha=-1.0), r"aux_loss_alpha must be >= 0"),
        (dict(dim=512.0), r"dim must be an int"),
        (dict(n_layers=True), r"n_layers must be an int"),
        (dict(use_moe=1), r"use_moe must be True or False"),
        (dict(dropout="0.1"), r"dropout must be a number"),
    ],
)
def test_invalid_configs_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLMconfig(**kwargs)


def test_all_problems_reported_at_once():
    with pytest.raises(ValueError) as e:
        LLMconfig(num_experts_per_tok=9, dropout=2.0)
    assert "num_experts_per_tok" in str(e.value) and "dropout" in str(e.value)


def test_dict_round_trip_is_exact_and_plain():
    c = LLMconfig(dim=256, n_heads=4, n_kv_heads=1, use_moe=True, n_shared_experts=0, norm_topk_prob=False, hidden_dim=640)
    d = c.to_dict()
    assert all(isinstance(v, (int, float, bool, type(None))) for v in d.values())
    assert LLMconfig.from_dict(d) == c
    assert set(d) == {f.name for f in dataclasses.fields(LLMconfig)}


def test_from_dict_missing_keys_take_defaults():
    assert LLMconfig.from_dict({"dim": 256, "n_heads": 4}) == LLMconfig(dim=256, n_heads=4)


def test_from_dict_unknown_key_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown LLMconfig field\(s\): 'n_head' \(did you mean 'n_heads'\?\)"):
        LLMconfig.from_dict({"n_head": 4})


def test_from_dict_rejects_non_mapping():
    with pytest.raises(TypeError, match="expects a dict"):
        LLMconfig.from_dict([("dim", 256)])


def test_json_round_trip_text_and_file(tmp_path):
    c = LLMconfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, rope_theta=5e4)
    text = c.to_json()
    assert json.loads(text)["rope_theta"] == 5e4
    assert LLMconfig.from_json(text) == c
    path = tmp_path / "config.json"
    assert c.to_json(path) == path.read_text()
    assert LLMconfig.from_json(path) == LLMconfig.from_json(str(path)) == c


def test_from_json_bad_text(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        LLMconfig.from_json(bad)
    with pytest.raises(FileNotFoundError):
        LLMconfig.from_json(tmp_path / "missing.json")
