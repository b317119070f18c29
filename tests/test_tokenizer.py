"""The tokenizer (zer02llm.tokenizer): exact round trips, streaming, the chat template against transformers, the
assistant mask, loading/saving, and the shipped files being what the command line trains."""
import json
import random
import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from zer02llm.corpus import CAST, FIRST_CAST
from zer02llm import tokenizer as tk
from zer02llm.tokenizer import (BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, ChatTokenizer, bytes_to_unicode,
                                default_tokenizer_dir, load_tokenizer, train_tokenizer)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


TEXTS = [
    "Mia had a red kite. She loved the red kite very much.",
    "我们从零开始训练一个小语言模型。",
    "emoji: 🙂👍🏽🎉 👨‍👩‍👧 flags 🇫🇷",
    "def f(x):\n\treturn {'a': x ** 2}  # comment\n",
    "  leading, trailing  \n\n\t\r\n   ",
    "",
    " ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "Ünïcödé ÀÉÎ ß ﬁ Ω ≈ ∑ \u00a0 nbsp \u200b zero-width \x00 nul \x7f",
]


def random_text(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x24F), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F), (0x3040, 0x30FF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
        if rng.random() < 0.02:
            out.append(rng.choice([BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]))
    return "".join(out)


def test_special_tokens(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert [tok.decode([i]) for i in (0, 1, 2)] == [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
    assert tok.encode(BOS_TOKEN + "x" + EOS_TOKEN)[0] == tok.bos_id and tok.encode("x" + EOS_TOKEN)[-1] == tok.eos_id
    vocab = json.loads((default_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert tok.vocab_size == len(vocab) and 259 < tok.vocab_size <= 6400


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_examples(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_random(tok):
    rng = random.Random(0)
    for _ in range(200):
        text = random_text(rng, rng.randint(1, 80))
        assert tok.decode(tok.encode(text)) == text, repr(text)
    batch = [random_text(rng, 30) for _ in range(20)]
    assert tok.encode_batch(batch) == [tok.encode(t) for t in batch]


def test_bytes_to_unicode_is_the_byte_level_alphabet():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"


def test_bytes_to_unicode_reads_tokens_back_as_the_library_decodes(tok):
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    specials = set(tok.tokenizer.get_added_tokens_decoder())
    raw = {i: bytes(byte_of[ch] for ch in tok.tokenizer.id_to_token(i))
           for i in range(tok.vocab_size) if i not in specials}
    rng = random.Random(1)
    for text in TEXTS + [random_text(rng, 50) for _ in range(50)]:
        ids = [i for i in tok.encode(text) if i not in specials]
        assert b"".join(raw[i] for i in ids).decode("utf-8") == tok.decode(ids)
    for _ in range(200):  # any byte sequence, cut anywhere: Python's "replace" writes U+FFFD where the library does
        ids = rng.choices(sorted(raw), k=rng.randint(1, 12))
        assert b"".join(raw[i] for i in ids).decode("utf-8", errors="replace") == tok.decode(ids)


# ---- streaming -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zh_tok():
    """A tokenizer trained on Chinese: some of its tokens end, or start, in the middle of a character."""
    zh = ("我们从零开始训练一个小语言模型。语言模型根据前面的词预测下一个词。"
          "分词器把文字切成小块，再把每一块变成一个数字。训练数据越多，模型学到的知识越多。"
          "小模型也可以讲简单的故事，回答简单的问题。")  # the text of the notebook's demo
    trained = train_tokenizer([zh] * 50, vocab_size=400)
    assert any("\ufffd" in trained.decode([i]) for i in trained.encode(zh)), "no token cuts a character"
    return trained


def stream_pieces(stream, ids, chunk=1):
    """Push ids `chunk` at a time; the pieces, then the flush."""
    pieces = [stream.push(ids[k:k + chunk] if chunk > 1 else ids[k]) for k in range(0, len(ids), chunk)]
    return pieces + [stream.flush()]


def assert_streams_like_decode(tok, ids, pieces, skip_special_tokens=False):
    """The contract: pieces join to decode(ids), and the text pushed so far is always a prefix of it, so no piece
    holds half a character (a premature U+FFFD would not be in decode's text at that place)."""
    text = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) == text, (ids, pieces, text)
    done = ""
    for piece in pieces[:-1]:
        done += piece
        assert text.startswith(done), (ids, pieces, text)
        if "\ufffd" not in text:
            assert "\ufffd" not in piece, (ids, pieces)


def random_ids(rng, tok, n):
    """Any id sequence: whole tokens, single bytes (half characters), special tokens, ids outside the vocabulary."""
    pools = [lambda: rng.randrange(tok.vocab_size), lambda: rng.randrange(3), lambda: rng.randrange(3, 259),
             lambda: tok.vocab_size + rng.randrange(100)]
    return [rng.choice(pools)() for _ in range(n)]


def test_stream_decoder_never_emits_half_a_character(tok, zh_tok):
    rng = random.Random(2)
    for t in (tok, zh_tok):
        for text in TEXTS + [random_text(rng, 60) for _ in range(100)]:
            ids = t.encode(text)
            pieces = stream_pieces(t.stream_decoder(), ids)
            assert_streams_like_decode(t, ids, pieces)
            assert "".join(pieces) == text and pieces[-1] == ""  # real text ends on a whole character


def test_stream_decoder_equals_decode_for_any_ids(tok, zh_tok):
    rng = random.Random(3)
    for t in (tok, zh_tok):
        for _ in range(300):
            ids = random_ids(rng, t, rng.randint(0, 25))
            assert_streams_like_decode(t, ids, stream_pieces(t.stream_decoder(), ids, chunk=rng.choice([1, 2, 5])))


def test_stream_decoder_flushes_a_cut_character_as_decode_does(tok, zh_tok):
    for t, text in [(tok, "ok 🙂!"), (tok, "中文 and é"), (zh_tok, "语言模型预测下一个词。")]:
        ids = t.encode(text)
        for cut in range(len(ids) + 1):
            pieces = stream_pieces(t.stream_decoder(), ids[:cut])
            assert_streams_like_decode(t, ids[:cut], pieces)
    stream = tok.stream_decoder()
    emoji = tok.encode("🙂")
    assert len(emoji) == 4 and [stream.push(i) for i in emoji[:2]] == ["", ""]
    assert stream.flush() == tok.decode(emoji[:2]) == "\ufffd"


def test_stream_decoder_returns_text_completed_inside_a_list(tok):
    ids = tok.encode("ok 🙂")
    stream = tok.stream_decoder()
    assert stream.push(ids[:-1]) == "ok " and stream.push(ids[-1]) == "🙂" and stream.flush() == ""


def test_stream_decoder_accepts_ints_lists_and_tensors_of_any_shape(tok):
    torch = pytest.importorskip("torch")
    ids = tok.encode("Mia had a red kite 🙂.\n中文")
    text = tok.decode(ids)
    for make in (list, tuple, torch.tensor, lambda x: torch.tensor(x).reshape(1, -1)):
        stream = tok.stream_decoder()
        got = stream.push(make(ids[:3])) + stream.push(torch.tensor(ids[3])) + stream.push(ids[4])
        got += stream.push(make(ids[5:])) + stream.flush()
        assert got == text, make
    stream = tok.stream_decoder()
    pairs = torch.tensor(ids[:len(ids) // 2 * 2]).reshape(-1, 2)  # (T/2, 2): read row by row
    assert stream.push(pairs) + stream.flush() == tok.decode(pairs.reshape(-1).tolist())
    assert stream.push([]) == "" and stream.push(torch.zeros(0, dtype=torch.long)) == "" and stream.flush() == ""


def test_stream_decoder_is_reusable_after_flush(tok):
    stream = tok.stream_decoder()
    first, second = tok.encode("first 🙂"), tok.encode("second 中")
    assert stream.push(first[:-2]) + stream.flush() == tok.decode(first[:-2])  # ends in half an emoji
    assert "".join(stream_pieces(stream, second)) == "second 中"  # nothing of the first stream is left
    assert "".join(stream_pieces(stream, first)) == "first 🙂"


def test_stream_decoder_skip_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\nHi 🙂<|im_end|>\n<|endoftext|>")
    for skip in (False, True):
        pieces = stream_pieces(tok.stream_decoder(skip_special_tokens=skip), ids)
        assert_streams_like_decode(tok, ids, pieces, skip_special_tokens=skip)
    assert "".join(stream_pieces(tok.stream_decoder(skip_special_tokens=True), ids)) == "assistant\nHi 🙂\n"
    assert "".join(stream_pieces(tok.stream_decoder(), ids)) == tok.decode(ids) and BOS_TOKEN in tok.decode(ids)


def test_stream_decoder_ids_outside_the_vocabulary_and_bad_ids(tok):
    stream, a = tok.stream_decoder(), tok.encode("a")[0]
    assert stream.push(tok.vocab_size + 5) == "" and stream.push(a) == "a" and stream.flush() == ""
    assert tok.decode([tok.vocab_size + 5, a]) == "a"  # decode skips it too
    with pytest.raises(ValueError, match="token ids"):
        stream.push([a, -1])
    with pytest.raises(ValueError, match="token ids"):
        stream.push(2**32)
    with pytest.raises(TypeError):
        stream.push(1.5)
    assert stream.push(a) == "a" and stream.flush() == ""  # a rejected push changes nothing


# ---- chat template --------------------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Which river flows through Korvel?"}],
    [{"role": "system", "content": "You are Zer02LLM."}, {"role": "user", "content": "Who are you?"},
     {"role": "assistant", "content": "I am Zer02LLM."}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3 + 3?\nThanks 🙂"}, {"role": "assistant", "content": "6.\n\nDone."}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "  spaced  "}],
    [{"role": "system", "content": "Be brief."}],
]


def chatml(messages, add_generation_prompt=False):  # independent reference of the template
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory, tok):
    transformers = pytest.importorskip("transformers")
    folder = tok.save(tmp_path_factory.mktemp("tok"))
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_matches_transformers_and_reference(tok, hf_tokenizer, messages, gen):
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
    assert ours == chatml(messages, gen)
    assert ours == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def test_transformers_reads_the_same_tokenizer(tok, hf_tokenizer):
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (1, 2, 0)
    assert len(hf_tokenizer) == tok.vocab_size
    rng = random.Random(3)
    for text in TEXTS + [random_text(rng, 40) for _ in range(30)]:
        ids = tok.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ids
        assert hf_tokenizer.decode(ids) == text


def test_unknown_role_and_bad_messages(tok):
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="content must be a string"):
        tok.apply_chat_template([{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        tok.encode_chat([{"content": "x"}])
    from jinja2 import TemplateError
    with pytest.raises(TemplateError, match="unknown role"):  # the template itself refuses too (for transformers)
        tk.compile_chat_template(CHAT_TEMPLATE).render(messages=[{"role": "tool", "content": "x"}])


def reference_assistant_mask(tok, messages):
    """Independent mask: tokenize the whole rendered string, locate each assistant reply (content + <|im_end|>) by
    character position, and mark the tokens that start inside a reply (the library's own character offsets)."""
    text = chatml(messages)
    spans, pos = [], 0
    for m in messages:
        start = pos + len(f"<|im_start|>{m['role']}\n")
        end = start + len(m["content"]) + len(EOS_TOKEN)
        if m["role"] == "assistant":
            spans.append((start, end))
        pos = end + 1
    encoding = tok.tokenizer.encode(text, add_special_tokens=False)
    mask = [any(a <= first < b for a, b in spans) for first, _ in encoding.offsets]
    return encoding.ids, mask


@pytest.mark.parametrize("messages", CONVERSATIONS[:3])
def test_encode_chat_mask_matches_reference(tok, messages):
    assert tok.encode_chat(messages) == reference_assistant_mask(tok, messages)


def test_encode_chat_on_built_in_sft_data(tok):
    from zer02llm.corpus import builtin_records

    for record in list(builtin_records(0, 0.02)["sft"])[:150]:
        messages = record["conversations"]
        ids, mask = tok.encode_chat(messages)
        assert (ids, mask) == reference_assistant_mask(tok, messages)
        assert ids == tok.encode(tok.apply_chat_template(messages))
        learned = tok.decode([i for i, m in zip(ids, mask) if m])
        assert learned == "".join(m["content"] + EOS_TOKEN for m in messages if m["role"] == "assistant")


def test_encode_chat_first_reply_token_is_learned(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    ids, mask = tok.encode_chat(messages)
    prompt = tok.encode(chatml(messages[:1], add_generation_prompt=True))
    assert mask[:len(prompt)] == [False] * len(prompt)
    assert mask[len(prompt)] is True and ids[len(prompt)] == tok.encode("Hello there")[0]
    assert ids[-2:] == [tok.eos_id, tok.encode("\n")[0]] and mask[-2:] == [True, False]


# ---- training, saving, loading ---------------------------------------------------------------------------------

def _content(folder):
    """What decides tokenization, independent of how a `tokenizers` version lays out its JSON."""
    saved = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in saved["model"]["merges"]]
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    return saved["model"]["vocab"], merges, saved["added_tokens"], saved["pre_tokenizer"], config


def test_command_line_reproduces_the_shipped_tokenizer(tmp_path, capsys):
    tk.main(["--train", "--out", str(tmp_path)])
    assert _content(tmp_path) == _content(default_tokenizer_dir()), (
        "the shipped tokenizer is not what the built-in corpus's first edition trains: "
        "run python -m zer02llm.tokenizer --train")
    assert "saved" in capsys.readouterr().out


def test_the_stories_cast_is_in_pieces_and_the_first_edition_whole(tok):
    """The corpus's stories need a cast the shipped tokenizer splits (chapter 08: copying pieces is learned sooner)."""
    def words(cast):
        return [w.split()[-1] for w in cast.children + cast.things + cast.colors + cast.places]
    today, first = words(CAST), words(FIRST_CAST)
    assert len(today) == len(set(today)) == 42 and all(len(tok.encode(" " + w)) > 1 for w in today)
    assert len(first) == 42 and all(len(tok.encode(" " + w)) == 1 for w in first)


def test_training_on_a_jsonl_file_and_specials_are_not_learned(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"<|im_start|>hello world {i}<|im_end|>"}) + "\n" for i in range(50)),
                    encoding="utf-8")
    trained = tk.main(["--train", "--data", str(data), "--vocab_size", "300", "--out", str(tmp_path / "t")])
    merges = json.loads(trained.tokenizer.to_str())["model"]["merges"]
    assert not any("|" in a + b for a, b in merges), "merges learned from the special tokens' text"
    assert load_tokenizer(tmp_path / "t").encode("hello world") == trained.encode("hello world")


def test_training_is_deterministic_and_validates():
    texts = ["the cat sat on the mat", "the dog sat on the log"] * 20
    a, b = train_tokenizer(texts, 300), train_tokenizer(texts, 300)
    assert a.tokenizer.to_str() == b.tokenizer.to_str() and a.fingerprint == b.fingerprint
    assert a.fingerprint != load_tokenizer().fingerprint
    with pytest.raises(ValueError, match="at least 259"):
        train_tokenizer(texts, 100)


def test_save_and_load(tmp_path, tok):
    folder = tok.save(tmp_path / "t")
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHAT_TEMPLATE and config["bos_token"] == BOS_TOKEN
    again = load_tokenizer(folder)
    assert again.fingerprint == tok.fingerprint and again.encode(TEXTS[2]) == tok.encode(TEXTS[2])


def test_load_tokenizer_paths(tmp_path, monkeypatch, tok):
    monkeypatch.chdir(tmp_path)
    assert load_tokenizer("model/zer02llm_tokenizer").fingerprint == tok.fingerprint  # seed path, absent: default
    small = train_tokenizer(["abc abd abe"] * 10, 270)
    small.save(tmp_path / "model" / "zer02llm_tokenizer")
    assert load_tokenizer("model/zer02llm_tokenizer").fingerprint == small.fingerprint  # seed path, present: used
    with pytest.raises(FileNotFoundError, match="no such tokenizer folder"):
        load_tokenizer(tmp_path / "elsewhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def test_config_tokens_as_added_token_dicts(tmp_path, tok):
    folder = tok.save(tmp_path / "t")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["eos_token"] = {"content": EOS_TOKEN, "special": True}
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    again = load_tokenizer(folder)
    assert again.eos_id == 2 and again.chat_template == CHAT_TEMPLATE


def test_rejects_tokenizers_that_are_not_byte_level():
    word_level = Tokenizer(models.WordLevel({"a": 0, PAD_TOKEN: 1, BOS_TOKEN: 2, EOS_TOKEN: 3}, unk_token="a"))
    with pytest.raises(ValueError, match="byte-level"):
        ChatTokenizer(word_level)


def test_missing_special_token():
    plain = train_tokenizer(["abc"] * 5, 262)
    with pytest.raises(ValueError, match="no special token"):
        ChatTokenizer(plain.tokenizer, bos_token="<s>")


def test_help_without_train(capsys):
    assert tk.main([]) is None
    assert "--train" in capsys.readouterr().out
