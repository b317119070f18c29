"""Datasets (zer02llm.data): packed pretraining blocks against a plain reference, the token-memmap cache, exact SFT
masks on hand-built conversations, the offset index, loaders with workers and DistributedSampler, bad input."""
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch

from zer02llm import data
from zer02llm.corpus import JsonlError, write_builtin_dataset
from zer02llm.data import IGNORE_INDEX, PretrainDataset, SFTDataset, encode_sft, make_loader
from zer02llm.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return write_builtin_dataset(tmp_path_factory.mktemp("ds"), seed=0, size_mb=0.1)


def write_lines(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def files_in(folder):
    return sorted(p.name for p in folder.iterdir())


def cut(path, n=3):
    path.write_bytes(path.read_bytes()[:-n])


def set_meta(meta_path, key, value):
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta_path.write_text(json.dumps(dict(meta, **{key: value(meta[key]) if callable(value) else value})),
                         encoding="utf-8")


def rebuilt_with_one_notice(build, cache, bad):
    """Load from the damaged `cache`: exactly one RuntimeWarning, naming the bad file and saying it is rebuilt; then
    the cache holds byte for byte what a fresh build writes, and is trusted from then on (no more notices)."""
    with pytest.warns(RuntimeWarning) as caught:
        ds = build(cache)
    notices = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(notices) == 1 and bad.name in notices[0] and "rebuilding" in notices[0], notices
    fresh = cache.parent / "fresh"
    fresh_ds = build(fresh)
    assert files_in(cache) == files_in(fresh)  # nothing left over, no .tmp
    for name in files_in(cache):
        assert (cache / name).read_bytes() == (fresh / name).read_bytes(), name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(cache)
    return ds, fresh_ds


# ---- pretraining ------------------------------------------------------------------------------------------------

def test_pretrain_blocks_match_a_plain_reference(tmp_path, tok):
    texts = ["Mia had a red kite.", "Korvel lies on the river Sora.", "3 plus 4 is 7.", "我们 🙂", "x" * 50]
    path = write_lines(tmp_path / "p.jsonl", [{"text": t} for t in texts * 3])
    stream = [i for t in texts * 3 for i in [tok.bos_id, *tok.encode(t), tok.eos_id]]
    L = 16
    ds = PretrainDataset(path, tok, max_seq_len=L)
    assert (ds.n_docs, ds.n_tokens, ds.skipped) == (15, len(stream), 0)
    assert len(ds) == len(stream) // L
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (L,)
        assert x.tolist() == stream[i * L:(i + 1) * L] and torch.equal(x, y)
    assert torch.equal(ds[-1][0], ds[len(ds) - 1][0])
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert ds.tokens.dtype == np.uint16 and ds.tokens_path.stat().st_size == 2 * len(stream)


def test_pretrain_cache_is_reused_and_invalidated(tmp_path, tok, monkeypatch):
    path = write_lines(tmp_path / "p.jsonl", [{"text": f"document number {i}"} for i in range(40)])
    first = PretrainDataset(path, tok, max_seq_len=8)
    assert first.tokens_path.parent == tmp_path
    cached = files_in(tmp_path)
    assert not [n for n in cached if n.endswith(".tmp")]

    def no_tokenizing(*a, **k):
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as m:
        m.setattr(type(tok), "encode_batch", no_tokenizing)
        again = PretrainDataset(path, tok, max_seq_len=32)  # another block size reuses the same token file
        assert again.tokens_path == first.tokens_path
    write_lines(path, [{"text": f"changed document {i}"} for i in range(40)])
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    changed = PretrainDataset(path, tok, max_seq_len=8)
    head = [tok.bos_id, *tok.encode("changed")]
    assert changed.tokens_path != first.tokens_path and changed[0][0].tolist()[:len(head)] == head
    other_tok = train_tokenizer(["document number changed"] * 10, 300)
    assert PretrainDataset(path, other_tok, max_seq_len=8).tokens_path != changed.tokens_path


def test_pretrain_cache_dir_and_nothing_half_written(tmp_path, tok, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    path = write_lines(src / "p.jsonl", [{"text": f"doc {i}"} for i in range(2000)])
    cache = tmp_path / "cache"
    calls = {"n": 0}
    real = type(tok).encode_batch

    def failing(self, texts):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-way")
        return real(self, texts)

    with monkeypatch.context() as m:
        m.setattr(type(tok), "encode_batch", failing)
        with pytest.raises(KeyboardInterrupt):
            PretrainDataset(path, tok, max_seq_len=8, cache_dir=cache)
    assert not cache.exists() or files_in(cache) == []
    ds = PretrainDataset(path, tok, max_seq_len=8, cache_dir=cache)
    assert ds.tokens_path.parent == cache and files_in(src) == ["p.jsonl"] and ds.n_docs == 2000


def test_pretrain_pickles_without_the_data(tmp_path, tok):
    path = write_lines(tmp_path / "p.jsonl", [{"text": "some words " * 50}] * 50)
    ds = PretrainDataset(path, tok, max_seq_len=8)
    _ = ds[0]
    blob = pickle.dumps(ds)
    assert len(blob) < ds.n_tokens  # the memmap is not copied into the pickle
    clone = pickle.loads(blob)
    assert torch.equal(clone[3][0], ds[3][0])


def test_pretrain_bad_input(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "Mia had a red kite."}\n{"text": "oops"\n{"text": "Tom had a blue ball."}\n')
    with pytest.raises(JsonlError, match=r"bad\.jsonl:2: invalid JSON"):
        PretrainDataset(path, tok, max_seq_len=4)
    assert files_in(tmp_path) == ["bad.jsonl"], "a failed preparation must leave nothing behind"
    ds = PretrainDataset(path, tok, max_seq_len=4, skip_bad_lines=True)
    assert (ds.n_docs, ds.skipped) == (2, 1)
    assert PretrainDataset(path, tok, max_seq_len=4, skip_bad_lines=True).skipped == 1  # from the cache too
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(JsonlError, match="empty"):
        PretrainDataset(tmp_path / "empty.jsonl", tok, max_seq_len=4)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(JsonlError, match=r"latin1\.jsonl:1: not valid UTF-8"):
        PretrainDataset(tmp_path / "latin1.jsonl", tok, max_seq_len=4)
    (tmp_path / "key.jsonl").write_text('{"content": "x"}\n', encoding="utf-8")
    with pytest.raises(JsonlError, match=r"key\.jsonl:1: expected an object with a 'text' key"):
        PretrainDataset(tmp_path / "key.jsonl", tok, max_seq_len=4)


def test_pretrain_too_little_data_and_bad_lengths(tmp_path, tok):
    path = write_lines(tmp_path / "p.jsonl", [{"text": "hi"}])
    with pytest.raises(ValueError, match="fewer than one block"):
        PretrainDataset(path, tok, max_seq_len=64)
    with pytest.raises(ValueError, match="max_seq_len must be at least 2"):
        PretrainDataset(path, tok, max_seq_len=1)


PRETRAIN_DAMAGE = {  # name: (what to do to the (.bin, .json) pair, which of the two the notice must name)
    "bin-truncated": (lambda b, j: cut(b), "bin"),
    "json-garbage": (lambda b, j: j.write_bytes(b"\xff\x00 {not json"), "json"),
    "bin-deleted-json-kept": (lambda b, j: b.unlink(), "bin"),
    "json-n_tokens-disagrees": (lambda b, j: set_meta(j, "n_tokens", lambda n: n + 1), "json"),
    "json-n_tokens-not-a-count": (lambda b, j: set_meta(j, "n_tokens", "1234"), "json"),
    "json-key-missing": (lambda b, j: j.write_text('{"source": "p.jsonl"}', encoding="utf-8"), "json"),
    "json-not-an-object": (lambda b, j: j.write_text("[1, 2]", encoding="utf-8"), "json"),
}


@pytest.mark.parametrize("damage, bad", PRETRAIN_DAMAGE.values(), ids=PRETRAIN_DAMAGE.keys())
def test_pretrain_damaged_cache_is_rebuilt(tmp_path, tok, damage, bad):
    """Defect: a truncated or corrupt token cache was trusted, and failed as a reshape error mid-training."""
    path = write_lines(tmp_path / "p.jsonl", [{"text": f"document number {i}"} for i in range(40)] + [{"text": 7}])

    def build(cache):
        return PretrainDataset(path, tok, max_seq_len=8, cache_dir=cache, skip_bad_lines=True)

    first = build(tmp_path / "cache")
    files = {"bin": first.tokens_path, "json": first.tokens_path.with_suffix(".json")}
    damage(files["bin"], files["json"])
    ds, fresh = rebuilt_with_one_notice(build, tmp_path / "cache", files[bad])
    assert (ds.n_docs, ds.n_tokens, ds.skipped, len(ds)) == (fresh.n_docs, fresh.n_tokens, fresh.skipped, len(fresh))
    assert ds.skipped == 1 and np.array_equal(ds.tokens, fresh.tokens)
    assert all(torch.equal(ds[i][0], fresh[i][0]) for i in range(len(ds)))


# ---- SFT --------------------------------------------------------------------------------------------------------

def expected_sft(tok, prompt_then_replies, L):
    """Hand-built reference: pieces of text, each (text, learned); ids by encoding each piece."""
    ids, labels = [], []
    for text, learned in prompt_then_replies:
        piece = tok.encode(text)
        ids += piece
        labels += piece if learned else [IGNORE_INDEX] * len(piece)
    return ids[:L], labels[:L]


def test_sft_single_turn_exact_mask(tok):
    messages = [{"role": "user", "content": "Which river flows through Korvel?"},
                {"role": "assistant", "content": "Korvel lies on the river Sora."}]
    x, y = encode_sft(tok, messages, 40)
    want_x, want_y = expected_sft(tok, [
        ("<|im_start|>user\nWhich river flows through Korvel?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Korvel lies on the river Sora.<|im_end|>", True),
        ("\n", False)], 40)
    assert x.tolist() == want_x and y.tolist() == want_y
    labelled = (y != IGNORE_INDEX).nonzero().flatten()
    assert tok.decode([x[labelled[0]].item()]) == "Korvel", "the first reply token must be learned"
    assert x[labelled[-1]].item() == tok.eos_id and y[labelled[-1] + 1].item() == IGNORE_INDEX
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (len(want_x),) and len(want_x) < 40


def test_sft_multi_turn_with_system_exact_mask(tok):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."},
                {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Zer02LLM."}]
    x, y = encode_sft(tok, messages, 80)
    want_x, want_y = expected_sft(tok, [
        ("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("2 plus 3 is 5.<|im_end|>", True),
        ("\n<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n", False),
        ("I am Zer02LLM.<|im_end|>", True),
        ("\n", False)], 80)
    assert x.tolist() == want_x and y.tolist() == want_y


def test_sft_truncation_keeps_labels_aligned(tok):
    messages = [{"role": "user", "content": "Tell me a story."},
                {"role": "assistant", "content": "Mia had a red kite. She loved the red kite very much. " * 4}]
    full_x, full_y = encode_sft(tok, messages, 200)
    n = len(full_x)
    assert n < 200
    for L in (5, 12, 20, n - 1, n, n + 3):
        x, y = encode_sft(tok, messages, L)
        assert x.shape == y.shape == (min(L, n),)
        assert torch.equal(x[:min(L, n)], full_x[:min(L, n)]) and torch.equal(y[:min(L, n)], full_y[:min(L, n)])
        labelled = y != IGNORE_INDEX
        assert torch.equal(y[labelled], x[labelled])


def test_sft_dataset_index_and_items(tmp_path, tok):
    convs = [
        {"conversations": [{"role": "user", "content": "héllo 🙂"}, {"role": "assistant", "content": "hi"}]},
        {"conversations": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "id": 7},
    ]
    path = tmp_path / "s.jsonl"
    lines = [json.dumps(c, ensure_ascii=False) for c in convs]
    path.write_text(lines[0] + "\n\n" + '{"conversations": [{"role": "tool", "content": "x"}]}\n' + lines[1] + "\n",
                    encoding="utf-8")
    with pytest.raises(JsonlError, match=r"s\.jsonl:3: 'conversations': message 0 has unknown role 'tool'"):
        SFTDataset(path, tok, 32)
    ds = SFTDataset(path, tok, 32, skip_bad_lines=True)
    assert len(ds) == 2 and ds.skipped == 1
    for i, c in enumerate(convs):
        assert ds.conversation(i) == c["conversations"]
        x, y = ds[i]
        want_x, want_y = encode_sft(tok, c["conversations"], 32)
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
    cached = files_in(tmp_path)
    assert len(cached) == 3 and not [n for n in cached if n.endswith(".tmp")]  # jsonl + index + metadata
    assert SFTDataset(path, tok, 32, skip_bad_lines=True).skipped == 1
    assert files_in(tmp_path) == cached


def test_sft_index_follows_the_file(tmp_path, tok):
    path = write_lines(tmp_path / "s.jsonl", [{"conversations": [{"role": "user", "content": "a"},
                                                                 {"role": "assistant", "content": "b"}]}])
    assert len(SFTDataset(path, tok, 16)) == 1
    write_lines(path, [{"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 3)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert len(SFTDataset(path, tok, 16)) == 3


def test_sft_bad_input(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(JsonlError, match="empty"):
        SFTDataset(tmp_path / "empty.jsonl", tok, 16)
    (tmp_path / "user_only.jsonl").write_text('{"conversations": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    with pytest.raises(JsonlError, match="no assistant message"):
        SFTDataset(tmp_path / "user_only.jsonl", tok, 16)
    with pytest.raises(ValueError, match="max_seq_len"):
        SFTDataset(tmp_path / "user_only.jsonl", tok, 0)


def test_sft_on_built_in_data_labels_exactly_the_replies(built, tok):
    ds = SFTDataset(built["sft"], tok, 512)
    for i in range(0, len(ds), 7):
        x, y = ds[i]
        replies = "".join(m["content"] + "<|im_end|>" for m in ds.conversation(i) if m["role"] == "assistant")
        assert tok.decode(y[y != IGNORE_INDEX].tolist()) == replies


def test_sft_collate_pads_each_batch_to_its_longest_example(built, tok):
    """Defect: every example was padded to max_seq_len (mean 58 real tokens of 512 on the built-in data)."""
    ds = SFTDataset(built["sft"], tok, 512)
    items = [ds[i] for i in range(8)]
    x, y, mask = ds.collate(items)
    longest = max(len(a) for a, _ in items)
    assert x.shape == y.shape == mask.shape == (8, longest) and longest < 512
    for row, (a, b) in enumerate(items):
        n = len(a)
        assert torch.equal(x[row, :n], a) and torch.equal(y[row, :n], b) and mask[row, :n].all()
        assert (x[row, n:] == tok.pad_id).all() and (y[row, n:] == IGNORE_INDEX).all() and not mask[row, n:].any()
    assert int(mask.sum()) == sum(len(a) for a, _ in items)


def _widen_last_span(npy, j):
    index = np.load(npy)
    index[-1, 1] += 10**6
    np.save(npy, index)


SFT_DAMAGE = {  # name: (what to do to the (.npy, .json) pair, which of the two the notice must name)
    "npy-truncated": (lambda n, j: cut(n), "npy"),
    "npy-garbage": (lambda n, j: n.write_bytes(b"\x93NUMPY garbage"), "npy"),
    "npy-span-outside-the-file": (_widen_last_span, "npy"),
    "json-garbage": (lambda n, j: j.write_bytes(b"\xff\x00 {not json"), "json"),
    "npy-deleted-json-kept": (lambda n, j: n.unlink(), "npy"),
    "json-n_conversations-disagrees": (lambda n, j: set_meta(j, "n_conversations", lambda k: k - 1), "json"),
    "json-skipped-not-a-count": (lambda n, j: set_meta(j, "skipped", True), "json"),
}


@pytest.mark.parametrize("damage, bad", SFT_DAMAGE.values(), ids=SFT_DAMAGE.keys())
def test_sft_damaged_index_is_rebuilt(tmp_path, tok, damage, bad):
    """Defect: a truncated or corrupt offset index was trusted, and failed at some random step of training."""
    conv = {"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = write_lines(tmp_path / "s.jsonl", [conv, {"conversations": []}, conv, conv])

    def build(cache):
        return SFTDataset(path, tok, 16, cache_dir=cache, skip_bad_lines=True)

    build(tmp_path / "cache")
    (npy,) = (tmp_path / "cache").glob("*.npy")
    files = {"npy": npy, "json": npy.with_suffix(".json")}
    damage(files["npy"], files["json"])
    ds, fresh = rebuilt_with_one_notice(build, tmp_path / "cache", files[bad])
    assert np.array_equal(ds.index, fresh.index) and (len(ds), ds.skipped) == (3, 1)
    assert [ds.conversation(i) for i in range(len(ds))] == [conv["conversations"]] * 3


# ---- the loader ---------------------------------------------------------------------------------------------------

def _all_batches(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


class Numbers(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([i]), torch.tensor([i])


def test_make_loader_order_depends_only_on_seed_and_epoch_and_skips_by_index():
    data = Numbers(40)
    ids = lambda loader: [tuple(b[0][:, 0].tolist()) for b in loader]  # noqa: E731
    e0 = ids(make_loader(data, 4, epoch=0, seed=3))
    assert e0 == ids(make_loader(data, 4, epoch=0, seed=3)), "an epoch's order depends only on (seed, epoch)"
    assert e0 != ids(make_loader(data, 4, epoch=1, seed=3)), "set_epoch must reshuffle"
    assert e0 != ids(make_loader(data, 4, epoch=0, seed=4))
    assert ids(make_loader(data, 4, epoch=0, seed=3, skip_batches=3)) == e0[3:]
    assert ids(make_loader(data, 4, shuffle=False))[0] == (0, 1, 2, 3)
    # two ranks of 2 see, together, exactly what one rank of 4 sees (DDP == a bigger batch), and nothing in common
    r0 = [b[0] for b in make_loader(data, 2, 0, seed=3, rank=0, world_size=2)]
    r1 = [b[0] for b in make_loader(data, 2, 0, seed=3, rank=1, world_size=2)]
    one = [b[0] for b in make_loader(data, 4, 0, seed=3)]
    for a, b, big in zip(r0, r1, one):
        assert sorted(torch.cat([a, b]).flatten().tolist()) == sorted(big.flatten().tolist())
    assert not set(torch.cat(r0).flatten().tolist()) & set(torch.cat(r1).flatten().tolist())
    with pytest.raises(ValueError, match="fewer than batch_size"):
        make_loader(data, batch_size=21, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        make_loader(data, batch_size=0)


def test_make_loader_uses_the_datasets_collate_through_subsets(built, tok):
    ds = SFTDataset(built["sft"], tok, 512)
    x, y, mask = next(iter(make_loader(torch.utils.data.Subset(ds, range(32)), batch_size=4)))
    assert x.shape[1] == int(mask.sum(-1).max()) < 512
    xp, yp = next(iter(make_loader(PretrainDataset(built["pretrain"], tok, max_seq_len=32), batch_size=4)))
    assert xp.shape == yp.shape == (4, 32) and xp.dtype == torch.long


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_workers_give_the_same_batches(built, tok, kind):
    ds = (PretrainDataset(built["pretrain"], tok, 32) if kind == "pretrain" else SFTDataset(built["sft"], tok, 64))
    plain = _all_batches(make_loader(ds, batch_size=8, seed=3))[:6]
    with_workers = []
    for batch in make_loader(ds, batch_size=8, seed=3, num_workers=2):
        with_workers.append(batch)
        if len(with_workers) == 6:
            break
    assert all(all(torch.equal(a, b) for a, b in zip(p, w)) for p, w in zip(plain, with_workers))


def test_tokenizers_parallelism_is_configured_for_workers(built, tok, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "unset")  # so that monkeypatch restores the original afterwards
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    make_loader(SFTDataset(built["sft"], tok, 32), batch_size=2, num_workers=1)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    make_loader(SFTDataset(built["sft"], tok, 32), batch_size=2, num_workers=1)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"


def test_module_has_no_duplicate_ignore_index():
    assert data.IGNORE_INDEX == -100 == torch.nn.CrossEntropyLoss().ignore_index
