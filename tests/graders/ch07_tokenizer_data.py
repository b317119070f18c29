"""Grader for solutions|exercises/07_tokenizer_data_exercises.ipynb.

Part A (build it): a byte-level BPE trainer (the byte alphabet, the pre-tokenizer, the merge loop), compared merge
for merge with Hugging Face `tokenizers`' `BpeTrainer`, set up here as chapter 07b sets it up, and with
`zer02llm.tokenizer.train_tokenizer`; and the SFT labels of a conversation, compared with `zer02llm.data.encode_sft`
and with labels derived independently here from the character offsets of the rendered conversation. When an answer
is wrong, the usual wrong trainers are rerun on the same corpus (a plain recount-every-merge trainer with one knob
per mistake) and the one that reproduces the learner's merges is named; otherwise the first wrong merge is explained
with the true pair counts at that step.

Part B (beyond the chapter): encoding with a merge list (against Hugging Face's BPE model), document masks and
positions for packed sequences, and the padding fraction (against loops written here).

Why the plain trainer is an exact reference: the library keeps the pair counts up to date incrementally and picks
pairs from a priority queue ordered by (count, then the smaller pair of ids), ids being the special tokens, then
the alphabet in code-point order, then merged symbols in creation order. A merge creates pairs only with the new
symbol, and no symbol is ever made by two different merges (a symbol's pieces never straddle its edges, so inside
its span every word evolves alike), so those incremental counts equal a full recount after every merge; the two
agree on every corpus tried, thousands of tie-heavy random ones included.
"""
import copy
import functools
import itertools
import json
import random
import re
from collections import Counter

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from grading import NotebookRun, call
from zer02llm.corpus import builtin_records
from zer02llm.data import IGNORE_INDEX, encode_sft
from zer02llm.tokenizer import (BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, SPECIAL_TOKENS, bytes_to_unicode,
                                compile_chat_template, load_tokenizer, train_tokenizer)

NOTEBOOK = "07_tokenizer_data_exercises.ipynb"

# --- Part A: the byte alphabet -------------------------------------------------------------------------------------

_LIBRARY_ALPHABET = set(pre_tokenizers.ByteLevel.alphabet())
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]


def check_byte_alphabet(run: NotebookRun):
    got = call(run, "byte_alphabet")
    want = bytes_to_unicode()
    if set(want.values()) != _LIBRARY_ALPHABET:
        raise AssertionError("grader: bytes_to_unicode() is not tokenizers' ByteLevel alphabet - a bug in the course")
    if not isinstance(got, dict) or sorted(got) != list(range(256)):
        keys = sorted(got)[:5] if isinstance(got, dict) else None
        raise AssertionError(f"byte_alphabet() should return a dict with the 256 keys 0..255 (the byte values), got "
                             f"{type(got).__name__}{f' with keys {keys}...' if keys is not None else ''}")
    wrong = [b for b in range(256) if got[b] != want[b]]
    if not wrong:
        return
    b = wrong[0]
    head = (f"byte_alphabet(): {len(wrong)} of 256 bytes map to the wrong character; byte {b:#04x} maps to "
            f"{got[b]!r}, expected {want[b]!r} (U+{ord(want[b]):04X})")
    shifted = [x for x in range(256) if x not in _PRINTABLE]
    if all(got[x] == chr(256 + x) for x in shifted):
        raise AssertionError(f"{head}: the unprintable bytes get chr(256 + byte), which leaves gaps; the n-th "
                             f"unprintable byte (n = 0, 1, ... in byte order) gets chr(256 + n), so space, the 33rd, "
                             f"is chr(288) = 'Ġ'")
    if all(got[x] == chr(x) for x in range(256)):
        raise AssertionError(f"{head}: every byte maps to chr(byte); only the printable ones ('!'..'~', '¡'..'¬', "
                             f"'®'..'ÿ') stand for themselves - space, newline, control bytes and 0xAD are shifted "
                             f"to code points from 256 up, so that every token is visible text")
    printable_got = [x for x in range(256) if got[x] == chr(x)]
    if printable_got != _PRINTABLE:
        extra = sorted(set(printable_got) - set(_PRINTABLE))
        missing = sorted(set(_PRINTABLE) - set(printable_got))
        raise AssertionError(f"{head}: the bytes that stand for themselves must be exactly '!'..'~', '¡'..'¬' and "
                             f"'®'..'ÿ' (188 bytes); yours also keep {[hex(x) for x in extra[:6]]} and shift "
                             f"{[hex(x) for x in missing[:6]]}")
    raise AssertionError(f"{head}: the unprintable bytes, in increasing order, get chr(256), chr(257), ...")


# --- Part A: the pre-tokenizer -------------------------------------------------------------------------------------

_SPECIALS = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False)  # as in zer02llm.tokenizer.train_tokenizer
_TEMPLATE = compile_chat_template(CHAT_TEMPLATE)


def _parts(texts: list[str]) -> list[str]:
    """The texts with the special tokens cut out, as train_tokenizer feeds them to the trainer."""
    return [part for text in texts for part in _SPECIALS.split(text) if part]


def _library_pieces(text: str) -> list[str]:
    return [piece for part in _parts([text]) for piece, _ in _BYTE_LEVEL.pre_tokenize_str(part)]


def _course_texts(n_documents: int, n_chats: int) -> list[str]:
    """Tiny-world documents, then conversations in the chat template (special tokens included)."""
    records = builtin_records(0, 0.2)
    return ([r["text"] for r in itertools.islice(records["pretrain"], n_documents)]
            + [_TEMPLATE.render(messages=r["conversations"]) for r in itertools.islice(records["sft"], n_chats)])


def _library_raw(part: str) -> list[str]:
    """The library's pieces of `part` as the original text (its offsets), before the byte mapping."""
    return [part[a:b] for _, (a, b) in _BYTE_LEVEL.pre_tokenize_str(part)]


_PRETOKENIZE_TEXTS = [
    "Korvel lies on the river Sora.",
    "It's 2024 -- I'm   fine, you're ok; we'll see. They'd say: \"she's\" & he've?",
    "  leading and trailing   \n\n\tindented\r\nwindows line\n",
    "x = 42  # the answer\nprint(x_y, __init__, a1b2)",
    "naïve café, Ærø, straße",
    "我们从零开始训练一个小语言模型。",
    "emoji 🙂👍🏽 and ✓ marks",
    "<|im_start|>user\nWhich river flows through Korvel?<|im_end|>\n<|im_start|>assistant\nThe Sora.<|im_end|>\n",
    "<|endoftext|>padding<|endoftext|>",
]


def check_pretokenize(run: NotebookRun):
    b2u = bytes_to_unicode()
    for text in _PRETOKENIZE_TEXTS + _course_texts(8, 4):
        got, want = call(run, "pretokenize", text), _library_pieces(text)
        if not isinstance(got, list) or not all(isinstance(p, str) for p in got):
            raise AssertionError(f"pretokenize should return a list of str, got {type(got).__name__}")
        if got == want:
            continue
        where = f"pretokenize({text[:60]!r}{'...' if len(text) > 60 else ''}) = {got[:12]}, expected {want[:12]}"
        raw = [piece for part in _parts([text]) for piece in _library_raw(part)]
        if got == raw:
            raise AssertionError(f"{where}: the pieces are right but not written in the byte alphabet - encode each "
                                 f"piece to UTF-8 and map every byte through byte_alphabet() (a space becomes 'Ġ')")
        if got == ["".join(b2u.get(ord(c), c) for c in piece) for piece in raw]:
            raise AssertionError(f"{where}: you map each character's code point, not its UTF-8 bytes; 'é' is the two "
                                 f"bytes c3 a9, i.e. 'Ã©' - use piece.encode('utf-8')")
        if "<|" in "".join(got):
            raise AssertionError(f"{where}: cut the special tokens out first (re.split on them): train_tokenizer "
                                 f"does, because they are added to the vocabulary whole, never learned")
        if got == ["".join(b2u[b] for b in w.encode()) for part in _parts([text]) for w in part.split()]:
            raise AssertionError(f"{where}: that is a split on whitespace; GPT-2's pattern keeps a word's leading "
                                 f"space (' river' -> 'Ġriver') and separates punctuation, numbers and space runs")
        k = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
        raise AssertionError(f"{where}: piece {k} is {got[k] if k < len(got) else None!r}, expected "
                             f"{want[k] if k < len(want) else None!r}. Check the pattern's classes: a letter is "
                             f"[^\\W\\d_], a number \\d, and the third class (neither space, letter nor number) "
                             f"includes '_'")


# --- Part A: the BPE trainer ---------------------------------------------------------------------------------------


def _merges_of(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    return [tuple(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]]


def _library_merges(texts: list[str], n_merges: int) -> list[tuple[str, str]]:
    """tokenizers' own BpeTrainer, configured here as chapter 07b configures it (not through zer02llm)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = _BYTE_LEVEL
    trainer = trainers.BpeTrainer(vocab_size=len(SPECIAL_TOKENS) + 256 + n_merges, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_parts(texts), trainer=trainer)
    return _merges_of(tokenizer)


def _package_merges(texts: list[str], n_merges: int) -> list[tuple[str, str]]:
    return _merges_of(train_tokenizer(texts, len(SPECIAL_TOKENS) + 256 + n_merges).tokenizer)


def _symbols(texts: list[str], cross: bool = False, strip: bool = True) -> list[tuple[str, ...]]:
    """Pre-tokens as tuples of byte characters; `cross` joins all the pre-tokens of a text into one sequence."""
    pieces = [[piece for part in (_parts([text]) if strip else [text])
               for piece, _ in _BYTE_LEVEL.pre_tokenize_str(part)] for text in texts]
    return [tuple("".join(p)) for p in pieces] if cross else [tuple(piece) for p in pieces for piece in p]


def _merge(word: tuple[str, ...], pair: tuple[str, str], how: str = "left") -> tuple[str, ...]:
    """Merge `pair` in `word`: left to right ("left", the library's way), right to left ("right"), or stepping
    only one symbol after a match ("step1")."""
    out, i = [], 0
    if how == "right":
        i = len(word) - 1
        while i >= 0:
            matched = i > 0 and (word[i - 1], word[i]) == pair
            out.append(pair[0] + pair[1] if matched else word[i])
            i -= 2 if matched else 1
        return tuple(reversed(out))
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(pair[0] + pair[1])
            i += 1 if how == "step1" else 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _count(words: Counter, how: str = "all") -> Counter:
    """Pair counts: every adjacent position weighted by the word's count (all), or one of the usual miscounts."""
    counts = Counter()
    for word, c in words.items():
        pairs = list(zip(word, word[1:]))
        if how == "once":
            pairs = list(dict.fromkeys(pairs))
        elif how == "nonoverlap":  # ('a', 'a') in 'aaa' counted once
            kept, i = [], 0
            while i < len(pairs):
                kept.append(pairs[i])
                i += 2 if i + 1 < len(pairs) and pairs[i] == pairs[i + 1] and pairs[i][0] == pairs[i][1] else 1
            pairs = kept
        for pair in pairs:
            counts[pair] += 1 if how == "unweighted" else c
    return counts


def _ids() -> dict[str, int]:
    """The library's symbol ids, less the special tokens' offset: the byte characters in code-point order."""
    return {ch: i for i, ch in enumerate(sorted(bytes_to_unicode().values()))}


def _plain_bpe(texts: list[str], n_merges: int, follow: list | None = None, cross: bool = False, strip: bool = True,
               tie: str = "id", count: str = "all", merge: str = "left",
               update: str = "recount") -> list[tuple[str, str]]:
    """Recount every pair after every merge and take the most frequent: the defaults reproduce the library, each
    other knob value is one usual mistake. With `follow`, stop at the first merge that differs from it (cheap)."""
    words = Counter(_symbols(texts, cross, strip))
    ids, byte_value = _ids(), {ch: b for b, ch in bytes_to_unicode().items()}
    merges: list[tuple[str, str]] = []
    counts = _count(words, count)
    while len(merges) < n_merges:
        if update == "recount" and merges:
            counts = _count(words, count)
        elif update == "add_only" and merges:  # new pairs added, destroyed ones never subtracted
            new = merges[-1][0] + merges[-1][1]
            counts.update({p: c for p, c in _count(words, count).items() if new in p})
        live = [(p, c) for p, c in counts.items() if c > 0 and (update == "recount" or p not in merges)]
        if not live:
            break
        top = max(c for _, c in live)
        tied = [p for p, c in live if c == top]
        best = {"id": lambda: min(tied, key=lambda p: (ids[p[0]], ids[p[1]])),
                "bytes": lambda: min(tied, key=lambda p: tuple(byte_value.get(s, 256 + ids[s]) for s in p)),
                "string": lambda: min(tied), "string_max": lambda: max(tied),
                "first": lambda: tied[0], "last": lambda: tied[-1]}[tie]()
        merges.append(best)
        if follow is not None and (len(merges) > len(follow) or follow[len(merges) - 1] != best):
            break
        ids.setdefault(best[0] + best[1], len(ids))
        merged = Counter()
        for word, c in words.items():
            merged[_merge(word, best, merge)] += c
        words = merged
    return merges


_TIE_RULE = ("Among tied pairs the library takes the smallest ids, first symbol first: ids number the 256 byte "
             "characters in code-point order, then each merged symbol in the order it was made")

_BPE_MISTAKES = [
    ("counts and merges pairs across pre-token boundaries (each text as one sequence of bytes); BPE counts pairs "
     "only inside a pre-token, so the end of 'the' and the 'Ġ' of ' river' never form a pair", dict(cross=True)),
    ("does not cut the special tokens out: their text is split and merged like any other (merges such as '<' + "
     "'|'); train_tokenizer removes them first, as they enter the vocabulary whole", dict(strip=False)),
    ("never updates the counts after a merge (stale counts): it merges pairs in the order of their counts at the "
     "start, so a merged symbol is never merged again and pairs that merges destroyed keep their old counts. "
     "Recount (or update) after every merge", dict(update="never")),
    ("adds the pairs a merge creates but never subtracts the pairs it destroys (stale counts): merging ('a', 'b') "
     "in 'xaby' also removes one ('x', 'a') and one ('b', 'y')", dict(update="add_only")),
    ("does not weight the pairs by how often each pre-token occurs: count(a, b) = sum over pre-tokens w of "
     "c(w) * (occurrences of (a, b) in w)", dict(count="unweighted")),
    ("counts each pair at most once per pre-token (a set of pairs): every adjacent position counts, so 'aaa' "
     "holds ('a', 'a') twice", dict(count="once")),
    ("counts a doubled pair without overlaps ('aaa' holds ('a', 'a') once in yours): every adjacent position "
     "counts, overlapping ones too, so 'aaa' holds it twice", dict(count="nonoverlap")),
    ("merges right to left: scan each pre-token left to right, so that 'aaa' becomes 'aa' + 'a', not 'a' + 'aa'",
     dict(merge="right")),
    ("steps one symbol after a merge instead of two, so the pair's second symbol is used again (in 'aaa' both "
     "overlapping ('a', 'a') merge, and symbols are duplicated): after merging at i, continue at i + 2",
     dict(merge="step1")),
    ("breaks ties by the pair seen first (what Counter.most_common and max() return, and what the chapter's toy "
     "loop did). " + _TIE_RULE, dict(tie="first")),
    ("breaks ties by the pair seen last. " + _TIE_RULE, dict(tie="last")),
    ("breaks ties by comparing the symbols as strings: 'ab' sorts before 'b' as a string, but as a merged symbol "
     "its id comes after every byte's. " + _TIE_RULE, dict(tie="string")),
    ("breaks ties towards the largest pair. " + _TIE_RULE, dict(tie="string_max")),
    ("numbers the bytes by their value (space = 32) to break ties; the library numbers the byte alphabet's "
     "characters in code-point order, so 'Ġ' (U+0120, the space) comes after every printable byte. " + _TIE_RULE,
     dict(tie="bytes")),
]


@functools.lru_cache(maxsize=1)
def _bpe_corpora() -> list[tuple[str, list[str], int]]:
    """(name, texts, number of merges): each mistake above changes the merges of at least one of these corpora."""
    return [("tiny-world", _course_texts(60, 20), 150),
            ("tie", ["ab ba ab ba cd dc cd dc ef fe", "xy yx xy yx"], 20),
            ("'aaa'", ["aaa bc aaa bc aaa bc bc"], 12),
            ("multi-byte", ["中文中文 café naïve 🙂🙂 the the", "中文 café 🙂"], 30)]


def _as_merges(got, what: str) -> list[tuple[str, str]]:
    if not isinstance(got, (list, tuple)) or not all(
            isinstance(m, (list, tuple)) and len(m) == 2 and all(isinstance(s, str) for s in m) for m in got):
        raise AssertionError(f"{what} should be a list of (str, str) pairs, got {type(got).__name__}"
                             f"{f' starting {list(got)[:3]}' if isinstance(got, (list, tuple)) else ''}")
    return [tuple(m) for m in got]


def _explain_step(texts: list[str], merges: list[tuple[str, str]], got: tuple[str, str], want: tuple[str, str]):
    """Why `got` is not the next merge after `merges`: the true counts of both pairs at that step."""
    state = {w: w for w in set(_symbols(texts))}  # each distinct pre-token -> its symbols after `merges`
    for pair in merges:
        state = {w: _merge(symbols, pair) for w, symbols in state.items()}
    counts = _count(Counter(state[w] for w in _symbols(texts)))
    ids = _ids()
    for a, b in merges:
        ids.setdefault(a + b, len(ids))
    n_got, n_want = counts.get(got, 0), counts[want]
    across = {(state[w][-1], state[v][0]) for text in texts for w, v in itertools.pairwise(_symbols([text]))}
    if n_got == 0 and got in across:
        return (f"{got} never occurs inside a pre-token, only across two of them ({got[0]!r} ends one, {got[1]!r} "
                f"starts the next): pairs are counted inside each pre-token, never across two")
    if n_got == 0:
        return (f"{got} does not occur at this point: earlier merges used up its symbols, so its count is 0 - are "
                f"your counts updated after each merge (stale counts)?")
    if n_got < n_want:
        return (f"{got} occurs {n_got} times at this point, {want} {n_want} times: your counts are off - every "
                f"adjacent position inside a pre-token counts (overlapping ones too: 'aaa' holds ('a', 'a') twice), "
                f"weighted by how often the pre-token occurs, and counts change after every merge")
    if n_got > n_want:
        return f"{got} occurs {n_got} times at this point, more than {want} ({n_want}) - a bug in the grader"
    return (f"a tie - both occur {n_want} times. {_TIE_RULE}: ids {tuple(ids.get(s) for s in want)} for "
            f"{want}, {tuple(ids.get(s) for s in got)} for yours")


def check_train_bpe(run: NotebookRun):
    alphabet = set(bytes_to_unicode().values())
    for name, texts, n in _bpe_corpora():
        want = _library_merges(texts, n)
        if _package_merges(texts, n) != want:
            raise AssertionError(f"grader: zer02llm's train_tokenizer and tokenizers' BpeTrainer disagree on the "
                                 f"{name} corpus - a bug in the course, not in your code")
        got = _as_merges(call(run, "train_bpe", list(texts), n), f"train_bpe(texts, {n})")
        if got == want:
            continue
        where = f"train_bpe on the {name} corpus ({n} merges)"
        odd = next((s for m in got for s in m if not set(s) <= alphabet), None)
        if odd is not None:
            raise AssertionError(f"{where}: the symbol {odd!r} is not written in the byte alphabet - merge the "
                                 f"pre-tokens of pretokenize(), whose characters are byte_alphabet()'s (a space is "
                                 f"'Ġ', 'é' is 'Ã©')")
        k = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
        if k == len(want):
            raise AssertionError(f"{where}: {len(got)} merges, the library makes {len(want)} (the first {k} agree): "
                                 f"stop after n_merges, or when no pair is left")
        if k == len(got):
            raise AssertionError(f"{where}: you stop after {len(got)} merges (all right so far); the library makes "
                                 f"{len(want)}: keep merging while some pair occurs at least once, up to n_merges")
        for why, knobs in _BPE_MISTAKES:
            if got == _plain_bpe(texts, n, follow=got, **knobs):
                raise AssertionError(f"{where}: merge {k + 1} is {got[k]}, the library's is {want[k]}, and all your "
                                     f"merges are those of a trainer that {why}")
        agree = f"merges 1-{k} agree; " if k else ""
        raise AssertionError(f"{where}: {agree}merge {k + 1} is {got[k]}, the library's is {want[k]}: "
                             f"{_explain_step(texts, want[:k], got[k], want[k])}")


# --- Part A: SFT labels --------------------------------------------------------------------------------------------


def _chats() -> list[list[dict]]:
    hand = [
        [{"role": "user", "content": "Which river flows through Korvel?"},
         {"role": "assistant", "content": "Korvel lies on the river Sora."}],
        [{"role": "system", "content": "Answer briefly."},
         {"role": "user", "content": "Which river flows through Korvel?"},
         {"role": "assistant", "content": "Korvel lies on the river Sora."},
         {"role": "user", "content": "What is 2 plus 3?"},
         {"role": "assistant", "content": "2 plus 3 is 5."}],
        [{"role": "user", "content": "谁住在这里？"},
         {"role": "assistant", "content": "Mia 住在 Korvel。🙂"}],
    ]
    return hand + [r["conversations"] for r in itertools.islice(builtin_records(0, 0.2)["sft"], 12)]


def _roles(tok, messages: list[dict]) -> tuple[list[int], list[int], list[str]]:
    """Independent of encode_chat: tokenize the whole ChatML text once, then label each token by the character span
    it covers. Returns ids, labels and each token's role ('user turn 1', 'header', 'reply', 'end', 'after')."""
    text, spans = "", []
    for i, m in enumerate(messages):
        header = f"{BOS_TOKEN}{m['role']}\n"
        start = len(text) + len(header)
        end = start + len(m["content"]) + len(EOS_TOKEN)
        spans.append((m["role"], i + 1, len(text), start, end))
        text += header + m["content"] + EOS_TOKEN + "\n"
    encoding = tok.tokenizer.encode(text, add_special_tokens=False)
    roles = []
    for a, b in encoding.offsets:
        role, turn, _, start, end = next(s for s in spans if s[2] <= a < s[4] + 1)
        if role != "assistant":
            roles.append(f"{role} turn {turn}")
        else:
            roles.append("header" if b <= start else "after" if a >= end else "end" if a >= end - len(EOS_TOKEN)
                         else "reply")
    labels = [i if r in ("reply", "end") else IGNORE_INDEX for i, r in zip(encoding.ids, roles)]
    return encoding.ids, labels, roles


def _labels_mistake(tok, ids: list[int], got: list[int], want: list[int], roles: list[str]) -> str:
    """Name what differs between the learner's labels and the right ones, most telling first."""
    extra = [t for t in range(len(ids)) if got[t] != IGNORE_INDEX and want[t] == IGNORE_INDEX]
    missing = [t for t in range(len(ids)) if got[t] == IGNORE_INDEX and want[t] != IGNORE_INDEX]

    def show(t: int) -> str:
        return repr(tok.decode([ids[t]]))

    found = []
    turns = [t for t in extra if " turn " in roles[t]]
    if turns:
        who = sorted({roles[t].split()[0] for t in turns})
        whose = " and ".join(f"the {w}'s" for w in who) + (" turn is" if len(who) == 1 else " turns are")
        found.append(f"{whose} labelled (position {turns[0]}, {show(turns[0])}, "
                     f"{roles[turns[0]]}): the model must learn to answer, not to write the prompt - only the "
                     f"assistant's reply and its <|im_end|> are learned")
    header = [t for t in extra if roles[t] == "header"]
    headers_end = [t for t in header if t + 1 < len(ids) and roles[t + 1] == "reply"]
    if header and header == headers_end:
        found.append(f"off by one at the start: the label starts one token early, on the {show(header[0])} that "
                     f"ends the header <|im_start|>assistant\\n (position {header[0]})")
    elif header:
        found.append(f"the assistant header <|im_start|>assistant\\n is labelled (position {header[0]}, "
                     f"{show(header[0])}): at inference the prompt ends with it (add_generation_prompt=True), so the "
                     f"model never has to write it")
    first = [t for t in missing if roles[t] == "reply" and roles[t - 1] == "header"]
    if first:
        found.append(f"off by one at the start: the reply's first token {show(first[0])} (position {first[0]}) is "
                     f"not labelled - the slip 07c describes in MiniMind's code; the first token of a reply is often "
                     f"the most informative")
    ends = [t for t in missing if roles[t] == "end"]
    if ends:
        found.append(f"the end token <|im_end|> (position {ends[0]}) is not labelled: the model must learn to stop - "
                     f"without it, generation runs on to max_new_tokens")
    after = [t for t in extra if roles[t] == "after"]
    if after:
        found.append(f"off by one at the end: the '\\n' after the reply's <|im_end|> (position {after[0]}) is "
                     f"labelled; generation stops at <|im_end|>, so that newline is never generated")
    rest = [t for t in missing if roles[t] == "reply" and t not in first]
    if rest and not found:
        found.append(f"reply tokens are not labelled (first at position {rest[0]}, {show(rest[0])}): every token of "
                     f"every assistant reply is learned")
    if found:
        return "; and ".join(found)
    t = next(t for t in range(len(ids)) if got[t] != want[t])
    return f"position {t} ({show(t)}, {roles[t]}) has label {got[t]}, expected {want[t]}"


def check_sft_example(run: NotebookRun):
    tok = load_tokenizer()
    for messages in _chats():
        full = len(encode_sft(tok, messages, 10**6)[0])
        for max_seq_len in dict.fromkeys([10**4, full - 3, 12]):
            want_ids, want_labels = encode_sft(tok, messages, max_seq_len)
            ids, labels, roles = _roles(tok, messages)
            ids, labels, roles = ids[:max_seq_len], labels[:max_seq_len], roles[:max_seq_len]
            if want_ids.tolist() != ids or want_labels.tolist() != labels:
                raise AssertionError("grader: encode_sft and the offset-based labels disagree - a bug in the course")
            got = call(run, "sft_example", tok, copy.deepcopy(messages), max_seq_len)
            where = f"sft_example(tok, {_short(messages)}, max_seq_len={max_seq_len})"
            if not (isinstance(got, tuple) and len(got) == 2 and all(isinstance(g, torch.Tensor) for g in got)):
                raise AssertionError(f"{where} should return a tuple (input_ids, labels) of two tensors, got "
                                     f"{type(got).__name__}")
            got_ids, got_labels = got
            for what, g in (("input_ids", got_ids), ("labels", got_labels)):
                if g.dtype != torch.long or g.dim() != 1:
                    raise AssertionError(f"{where}: {what} should be a 1-D torch.long tensor, got {g.dtype} of shape "
                                         f"{tuple(g.shape)}")
            got_ids, got_labels = got_ids.tolist(), got_labels.tolist()
            if len(got_ids) != len(ids):
                hint = (" - cut input_ids and labels together to max_seq_len" if len(got_ids) == full > max_seq_len
                        else "")
                raise AssertionError(f"{where}: {len(got_ids)} tokens, expected {len(ids)}{hint}")
            if got_ids != ids:
                t = next(t for t in range(len(ids)) if got_ids[t] != ids[t])
                raise AssertionError(f"{where}: input_ids differ from encode_sft's first at position {t}: "
                                     f"{tok.decode([got_ids[t]])!r}, expected {tok.decode([ids[t]])!r} - render "
                                     f"<|im_start|>role\\ncontent<|im_end|>\\n for every message")
            if len(got_labels) != len(ids):
                raise AssertionError(f"{where}: {len(got_labels)} labels for {len(ids)} tokens - cut both together")
            wrong_value = [t for t in range(len(ids)) if got_labels[t] not in (IGNORE_INDEX, ids[t])]
            if wrong_value:
                t = wrong_value[0]
                shifted = all(s + 1 < len(ids) and got_labels[s] == ids[s + 1] for s in wrong_value)
                raise AssertionError(
                    f"{where}: labels[{t}] = {got_labels[t]} is neither -100 nor input_ids[{t}] = {ids[t]}"
                    + (": your labels are shifted by one. Do not shift: the model compares the logits at t with "
                       "labels[t + 1] itself (chapter 06), so labels[t] is input_ids[t] or -100" if shifted else
                       ": a learned position holds the token's own id"))
            if got_labels != labels:
                raise AssertionError(f"{where}: {_labels_mistake(tok, ids, got_labels, labels, roles)}")


def _short(messages: list[dict]) -> str:
    return "[" + ", ".join(f"{m['role']}: {m['content'][:24]!r}" for m in messages) + "]"


# --- Part B: beyond the chapter ----------------------------------------------------------------------------------

_WORDS = ("the then there these those low lower lowest slow slower slowest new newer newest wide wider widest "
          "banana bandana cabana mississippi assess tattoo aaaa abababab").split()


def _library_bpe(vocab_size: int) -> tuple[Tokenizer, list[tuple[str, str]]]:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator([" ".join(_WORDS * 3 + _WORDS[:8] * 4)],
                                  trainer=trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    return tokenizer, [tuple(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]]


def check_bpe_encode(run: NotebookRun):
    rng = random.Random(0)
    alphabet = sorted(set("".join(_WORDS)))
    probes = _WORDS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(60)]
    for vocab_size in (30, 60, 120):
        reference, merges = _library_bpe(vocab_size)
        for word in probes:
            got, want = call(run, "bpe_encode", word, list(merges)), reference.encode(word).tokens
            if got != want:
                raise AssertionError(f"bpe_encode({word!r}) with {len(merges)} merges gave {got}, Hugging Face's BPE "
                                     f"gives {want}: merge the lowest-rank (earliest learned) pair first, every "
                                     f"occurrence")
    if call(run, "bpe_encode", "abc", []) != ["a", "b", "c"]:
        raise AssertionError("with no merges, bpe_encode should return the single characters")


def _reference_mask(ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    B, T = ids.shape
    out = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        doc, docs = 0, []
        for t in range(T):
            doc += int(ids[b, t] == bos_id)
            docs.append(doc)
        for i in range(T):
            for j in range(i + 1):
                out[b, 0, i, j] = docs[i] == docs[j]
    return out


def _reference_positions(ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    out = torch.zeros_like(ids)
    for b in range(ids.shape[0]):
        pos = 0
        for t in range(ids.shape[1]):
            pos = 0 if ids[b, t] == bos_id else (pos + 1 if t else 0)
            out[b, t] = pos
    return out


def _packed_batches():
    g = torch.Generator().manual_seed(3)
    yield torch.tensor([[7, 8, 1, 5, 6, 2, 1, 9]])
    yield torch.tensor([[1, 4, 4, 2, 1, 4, 2, 1]])
    yield torch.randint(0, 6, (4, 24), generator=g)  # bos_id=1 appears at random places
    yield torch.full((2, 5), 3)                      # no document start at all


def check_document_mask(run: NotebookRun):
    for ids in _packed_batches():
        got = call(run, "document_mask", ids.clone(), 1)
        want = _reference_mask(ids, 1)
        if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
            raise AssertionError(f"document_mask should return a bool tensor, got {getattr(got, 'dtype', type(got))}")
        if got.shape != want.shape:
            raise AssertionError(f"document_mask of input {tuple(ids.shape)}: shape {tuple(got.shape)}, expected "
                                 f"{tuple(want.shape)} (B, 1, T, T)")
        if not torch.equal(got, want):
            b, _, i, j = (got != want).nonzero()[0].tolist()
            raise AssertionError(f"document_mask{tuple(ids.shape)}: batch {b}, query {i}, key {j} is "
                                 f"{bool(got[b, 0, i, j])}, expected {bool(want[b, 0, i, j])} (ids {ids[b].tolist()})")


def check_document_positions(run: NotebookRun):
    for ids in _packed_batches():
        got = call(run, "document_positions", ids.clone(), 1)
        want = _reference_positions(ids, 1)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != torch.long:
            raise AssertionError(f"document_positions should return a long tensor of shape {tuple(want.shape)}, got "
                                 f"{getattr(got, 'dtype', type(got))} {tuple(getattr(got, 'shape', ()))}")
        if not torch.equal(got, want):
            b = int((got != want).any(1).nonzero()[0])
            raise AssertionError(f"document_positions for ids {ids[b].tolist()}: got {got[b].tolist()}, expected "
                                 f"{want[b].tolist()}")


def _reference_padding(lengths, batch_size, max_seq_len, sort):
    clipped = [min(n, max_seq_len) for n in lengths]
    clipped = sorted(clipped) if sort else clipped
    batches = [clipped[i:i + batch_size] for i in range(0, len(clipped), batch_size)]
    return 1 - sum(map(sum, batches)) / sum(len(b) * max(b) for b in batches)


def check_padding_fraction(run: NotebookRun):
    cases = [([4, 4, 4, 4], 2, 10, False), ([1, 9, 1, 9], 2, 100, False), ([1, 9, 1, 9], 2, 100, True),
             ([5, 300, 20], 2, 64, False), ([3, 1, 2, 8, 8, 5, 7], 3, 6, True)]
    rng = random.Random(4)
    cases += [([rng.randint(1, 500) for _ in range(rng.randint(1, 60))], rng.randint(1, 9), 256, rng.random() < 0.5)
              for _ in range(20)]
    for lengths, batch_size, max_seq_len, sort in cases:
        got = call(run, "padding_fraction", list(lengths), batch_size, max_seq_len, sort)
        want = _reference_padding(lengths, batch_size, max_seq_len, sort)
        if not isinstance(got, float) or abs(got - want) > 1e-9:
            raise AssertionError(f"padding_fraction({lengths[:8]}{'...' if len(lengths) > 8 else ''}, "
                                 f"batch_size={batch_size}, max_seq_len={max_seq_len}, sort={sort}) = {got!r}, "
                                 f"expected {want:.6f}")
