"""Grader for solutions|exercises/07_tokenizer_data_exercises.ipynb."""
import json
import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from grading import NotebookRun, call

NOTEBOOK = "07_tokenizer_data_exercises.ipynb"

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
                                     f"gives {want}: merge the lowest-rank (earliest learned) pair first, every occurrence")
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
            raise AssertionError(f"document_mask of input {tuple(ids.shape)}: shape {tuple(got.shape)}, expected {tuple(want.shape)} (B, 1, T, T)")
        if not torch.equal(got, want):
            b, _, i, j = (got != want).nonzero()[0].tolist()
            raise AssertionError(f"document_mask{tuple(ids.shape)}: batch {b}, query {i}, key {j} is {bool(got[b, 0, i, j])}, "
                                 f"expected {bool(want[b, 0, i, j])} (ids {ids[b].tolist()})")


def check_document_positions(run: NotebookRun):
    for ids in _packed_batches():
        got = call(run, "document_positions", ids.clone(), 1)
        want = _reference_positions(ids, 1)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != torch.long:
            raise AssertionError(f"document_positions should return a long tensor of shape {tuple(want.shape)}, got "
                                 f"{getattr(got, 'dtype', type(got))} {tuple(getattr(got, 'shape', ()))}")
        if not torch.equal(got, want):
            b = int((got != want).any(1).nonzero()[0])
            raise AssertionError(f"document_positions for ids {ids[b].tolist()}: got {got[b].tolist()}, expected {want[b].tolist()}")


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
            raise AssertionError(f"padding_fraction({lengths[:8]}{'...' if len(lengths) > 8 else ''}, batch_size={batch_size}, "
                                 f"max_seq_len={max_seq_len}, sort={sort}) = {got!r}, expected {want:.6f}")
