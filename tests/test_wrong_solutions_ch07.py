"""Chapter 07's graders name the usual mistakes: each wrong implementation below fails its check with a message that
says what is wrong, and a correct implementation passes. No notebook runs: the learner's namespace is faked, and the
wrong functions are written the way a learner would write them."""
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from grading import NotebookRun
from graders import ch07_tokenizer_data as grader

IGNORE = -100


def _run(**ns) -> NotebookRun:
    return NotebookRun(Path(grader.NOTEBOOK), ns)


# --- the byte alphabet ---------------------------------------------------------------------------------------------

PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]


def byte_alphabet() -> dict[int, str]:
    table = {b: chr(b) for b in PRINTABLE}
    table.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in PRINTABLE)})
    return dict(sorted(table.items()))


def test_a_correct_byte_alphabet_passes():
    grader.check_byte_alphabet(_run(byte_alphabet=byte_alphabet))


@pytest.mark.parametrize("table,words", [
    ({b: chr(b) if b in PRINTABLE else chr(256 + b) for b in range(256)}, r"chr\(256 \+ byte\), which leaves gaps"),
    ({b: chr(b) for b in range(256)}, "every byte maps to chr"),
    ({b: chr(b) if b in PRINTABLE or b == 32 else chr(256 + n) for n, b in enumerate(range(256))}, "bytes that stand"),
])
def test_a_wrong_byte_alphabet_is_named(table, words):
    with pytest.raises(AssertionError, match=words):
        grader.check_byte_alphabet(_run(byte_alphabet=lambda: table))


# --- the pre-tokenizer ---------------------------------------------------------------------------------------------

SPECIALS = re.compile(r"<\|endoftext\|>|<\|im_start\|>|<\|im_end\|>")
PATTERN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")
BYTE_CHAR = byte_alphabet()


def pretokenizer(pattern=PATTERN, specials: bool = True, to_bytes: bool = True, code_points: bool = False):
    """A pre-tokenizer with one knob per usual slip; the defaults are right."""

    def pretokenize(text: str) -> list[str]:
        parts = [p for p in SPECIALS.split(text) if p] if specials else [text]
        pieces = [piece for part in parts for piece in (pattern.findall(part) if pattern else part.split())]
        if code_points:
            return ["".join(BYTE_CHAR.get(ord(c), c) for c in piece) for piece in pieces]
        return ["".join(BYTE_CHAR[b] for b in piece.encode()) for piece in pieces] if to_bytes else pieces

    return pretokenize


def test_a_correct_pretokenize_passes():
    grader.check_pretokenize(_run(pretokenize=pretokenizer()))


@pytest.mark.parametrize("fn,words", [
    (pretokenizer(to_bytes=False), "not written in the byte alphabet"),
    (pretokenizer(code_points=True), "code point, not its UTF-8 bytes"),
    (pretokenizer(specials=False), "cut the special tokens out"),
    (pretokenizer(pattern=None), "split on whitespace"),
    (pretokenizer(pattern=re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\w+| ?[^\s\w]+|\s+(?!\S)|\s+")), "includes '_'"),
])
def test_a_wrong_pretokenize_is_named(fn, words):
    with pytest.raises(AssertionError, match=words):
        grader.check_pretokenize(_run(pretokenize=fn))


# --- the BPE trainer -----------------------------------------------------------------------------------------------

CODE_POINT_IDS = {ch: i for i, ch in enumerate(sorted(BYTE_CHAR.values()))}


def pair_counts(words: Counter, once: bool = False, weighted: bool = True) -> Counter:
    counts = Counter()
    for word, c in words.items():
        pairs = set(zip(word, word[1:])) if once else zip(word, word[1:])
        for pair in pairs:
            counts[pair] += c if weighted else 1
    return counts


def merge_pair(word: tuple, pair: tuple, step: int = 2) -> tuple:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += step
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def merge_right_to_left(word: tuple, pair: tuple) -> tuple:
    out, i = [], len(word) - 1
    while i >= 0:
        if i > 0 and (word[i - 1], word[i]) == pair:
            out.insert(0, word[i - 1] + word[i])
            i -= 2
        else:
            out.insert(0, word[i])
            i -= 1
    return tuple(out)


def by_ids(counts: Counter, ids: dict) -> tuple:
    """The library's rule: the highest count, then the smallest (first id, second id)."""
    return min(counts, key=lambda p: (-counts[p], ids[p[0]], ids[p[1]]))


def trainer(words_of=None, pick=by_ids, merge=merge_pair, recount: bool = True, **count_knobs):
    """A learner's recount-every-merge trainer with one knob per usual mistake; the defaults are right."""
    pretokenize = pretokenizer()

    def train_bpe(texts: list[str], n_merges: int) -> list[tuple[str, str]]:
        words = Counter(words_of(texts) if words_of else [tuple(p) for t in texts for p in pretokenize(t)])
        ids, merges = dict(CODE_POINT_IDS), []
        counts = pair_counts(words, **count_knobs)
        while len(merges) < n_merges and counts:
            best = pick(counts, ids)
            merges.append(best)
            ids.setdefault(best[0] + best[1], len(ids))
            words = Counter({merge(w, best): c for w, c in words.items()})
            if recount:
                counts = pair_counts(words, **count_knobs)
            else:
                del counts[best]
        return merges

    return train_bpe


def train_bpe_minbpe_style(texts: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Bytes as ints 0..255 and merged ids from 256, ties to the smallest id: tie-breaking by byte value."""
    words = Counter(tuple(piece.encode()) for t in texts for part in SPECIALS.split(t) if part
                    for piece in PATTERN.findall(part))
    text_of = {b: BYTE_CHAR[b] for b in range(256)}
    merges = []
    while len(merges) < n_merges:
        counts = pair_counts(words)
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        new = 256 + len(merges)
        text_of[new] = text_of[best[0]] + text_of[best[1]]
        merges.append((text_of[best[0]], text_of[best[1]]))
        merged = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                hit = i + 1 < len(w) and (w[i], w[i + 1]) == best
                out.append(new if hit else w[i])
                i += 2 if hit else 1
            merged[tuple(out)] += c
        words = merged
    return merges


def whole_texts(texts: list[str]) -> list[tuple]:
    """Each text's pre-tokens joined into one sequence, so pairs span word boundaries."""
    pretokenize = pretokenizer()
    return [tuple("".join(pretokenize(t))) for t in texts]


def test_the_graders_plain_trainer_is_the_library():
    """The grader's recount-every-merge trainer (its reference for naming mistakes) gives tokenizers' merges on
    random tie-heavy corpora: few symbols, repeated runs like 'aaa', spaces, multi-byte characters."""
    rng = random.Random(0)
    for _ in range(200):
        alphabet = rng.choice(["ab", "abc", "aab", "ab ", "aa b", "ab c", "aé 中"])
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(rng.randint(1, 5))]
        n = rng.randint(1, 30)
        assert grader._plain_bpe(texts, n) == grader._library_merges(texts, n), (texts, n)


def test_a_correct_train_bpe_passes():
    grader.check_train_bpe(_run(train_bpe=trainer()))


@pytest.mark.parametrize("fn,words", [
    (trainer(words_of=whole_texts), "across pre-token boundaries"),
    (trainer(recount=False), "never updates the counts after a merge"),
    (trainer(pick=lambda counts, ids: max(counts, key=counts.get)), "breaks ties by the pair seen first"),
    (trainer(pick=lambda counts, ids: min(counts, key=lambda p: (-counts[p], p))), "comparing the symbols as strings"),
    (train_bpe_minbpe_style, r"numbers the bytes by their value"),
    (trainer(once=True), "at most once per pre-token"),
    (trainer(weighted=False), "does not weight the pairs"),
    (trainer(merge=lambda w, p: merge_pair(w, p, step=1)), "steps one symbol after a merge"),
    (trainer(merge=merge_right_to_left), "merges right to left"),
])
def test_a_wrong_train_bpe_is_named(fn, words):
    with pytest.raises(AssertionError, match=words):
        grader.check_train_bpe(_run(train_bpe=fn))


def test_pairs_across_pre_tokens_are_named_at_the_first_merge_they_change():
    """Joining the pre-tokens of each special-token-free part (not of the whole text, which the grader's own wrong
    trainer does): the first wrong merge is explained as a pair that spans two pre-tokens."""
    pretokenize = pretokenizer()

    def per_part(texts: list[str]) -> list[tuple]:
        return [tuple("".join(pretokenize(part))) for t in texts for part in SPECIALS.split(t) if part]

    with pytest.raises(AssertionError, match="across"):
        grader.check_train_bpe(_run(train_bpe=trainer(words_of=per_part)))


def test_a_train_bpe_on_characters_is_named():
    def train_on_characters(texts, n_merges):
        return [(a.replace("Ġ", " "), b.replace("Ġ", " ")) for a, b in trainer()(texts, n_merges)]

    with pytest.raises(AssertionError, match="not written in the byte alphabet"):
        grader.check_train_bpe(_run(train_bpe=train_on_characters))


def test_a_tie_broken_some_other_way_is_explained_at_the_merge_it_changes():
    """No known mistake reproduces these merges: the message explains the first wrong merge with the true counts."""
    def largest_ids(counts, ids):
        return min(counts, key=lambda p: (-counts[p], -ids[p[0]], ids[p[1]]))

    with pytest.raises(AssertionError, match=r"merge \d+ is .*: a tie - both occur \d+ times"):
        grader.check_train_bpe(_run(train_bpe=trainer(pick=largest_ids)))


# --- SFT labels ----------------------------------------------------------------------------------------------------


def sft(start: int = 0, end: int = 0, header: bool = False, everything: bool = False, eos: bool = True,
        shift: bool = False, truncate: bool = True):
    """sft_example with one knob per usual slip: `start`/`end` move the labelled span's edges (-1 = one token
    earlier, +1 = one later), and the defaults are right."""

    def sft_example(tokenizer, messages, max_seq_len):
        ids, learn = [], []
        for m in messages:
            head = tokenizer.encode(f"<|im_start|>{m['role']}\n")
            body = tokenizer.encode(m["content"])
            tail = [tokenizer.eos_id] + tokenizer.encode("\n")
            mine = m["role"] == "assistant"
            flags = [mine and header] * len(head) + [mine] * len(body) + [mine and eos, False]
            if mine:
                first, last = len(ids) + len(head), len(ids) + len(head) + len(body)  # reply, its <|im_end|>
                if start:
                    flags[first - len(ids) + min(start, 0)] = start < 0
                if end:
                    flags[last - len(ids) + max(end, 0)] = end > 0
            ids += head + body + tail
            learn += flags
        labels = [t if (f or everything) else IGNORE for t, f in zip(ids, learn)]
        if shift:
            labels = labels[1:] + [IGNORE]
        if truncate:
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        return torch.tensor(ids), torch.tensor(labels)

    return sft_example


def test_a_correct_sft_example_passes():
    grader.check_sft_example(_run(sft_example=sft()))


@pytest.mark.parametrize("fn,words", [
    (sft(everything=True), "the user's turn is labelled"),
    (sft(header=True), r"the assistant header <\|im_start\|>assistant\\n is labelled"),
    (sft(eos=False), r"the end token <\|im_end\|> .* is not labelled"),
    (sft(start=-1), "off by one at the start: the label starts one token early"),
    (sft(start=1), "off by one at the start: the reply's first token"),
    (sft(end=1), r"off by one at the end: the '\\n' after"),
    (sft(shift=True), "shifted by one"),
    (sft(truncate=False), "cut input_ids and labels together to max_seq_len"),
])
def test_a_wrong_sft_example_is_named(fn, words):
    with pytest.raises(AssertionError, match=words):
        grader.check_sft_example(_run(sft_example=fn))
