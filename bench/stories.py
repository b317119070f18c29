"""Time to copying: what makes the in-context skill under consistent stories arrive inside the CPU budget.

`python -m bench.stories [--cast builtin|wide|pieces] [--tokenizer shipped|retrained] [--align stream|bos] [--steps 900]
[--batch 16] [--lr 4e-3] [--min_lr_ratio 0.1] [--n_kv_heads 2] [--seed 0] [--out bench/results/stories.jsonl]`
pretrains chapter 08's model on the built-in corpus with one knob changed and appends one row: the copy probability
of the hero's name, the thing and the colour (chapter 07d's `copy_probability`) every `--eval_every` steps, the fact
probe, the share of 64 stories sampled from "Once upon a time" that keep their cast, and their commonest problems.

* `--cast wide` writes the corpus with a wider cast — 48 children instead of 16, 30 things instead of 10, 16 colours
  and 16 places instead of 8 — everything else the same. With `--tokenizer shipped` the new words are split into
  pieces by the shipped tokenizer (trained on the built-in cast); `--tokenizer retrained` trains one on this corpus,
  as `python -m zer02llm.tokenizer --train` does for the built-in one, so that every word is one token again.
  `--cast pieces` is as wide, with none of the built-in cast: every word of it is split by the shipped tokenizer.
* `--align bos` cuts the token stream so that every block starts with a document (a document that does not fit is
  cut, and begins the next block whole) instead of at every `max_seq_len` tokens.

`--table` prints the rows collected so far as the markdown table of bench/README.md. Results are deterministic for
a given machine; seconds depend on how busy it is (the load average is recorded).
"""
import argparse
import os
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.rows import append_row, markdown_table, read_rows  # noqa: E402
from zer02llm import corpus  # noqa: E402
from zer02llm.config import LLMconfig  # noqa: E402
from zer02llm.data import PretrainDataset  # noqa: E402
from zer02llm.evaluate import (copy_probability, probe_accuracy, probe_items, sample_replies,  # noqa: E402
                               story_consistency, story_problems)
from zer02llm.model import LLM  # noqa: E402
from zer02llm.tokenizer import builtin_texts, load_tokenizer, train_tokenizer  # noqa: E402
from zer02llm.trainer import TrainConfig, Trainer, split_train_val  # noqa: E402
from zer02llm.utils import seed_everything  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "stories.jsonl"
WIDE_CAST = {
    "GIRLS": corpus.GIRLS + ["Ava", "Lucy", "Grace", "Chloe", "Ivy", "Rose", "Amy", "Kate", "Jane", "Sara", "Lena",
                             "Maya", "Tess", "Alice", "Cora", "Eva"],
    "BOYS": corpus.BOYS + ["Noah", "Liam", "Eli", "Adam", "Luke", "Ryan", "Jake", "Paul", "Dan", "Joe", "Tim", "Ned",
                           "Kai", "Ian", "Rex", "Ross"],
    "THINGS": corpus.THINGS + ["lamp", "cup", "sled", "puzzle", "teddy", "robot", "train", "truck", "doll", "flute",
                               "bell", "box", "basket", "scarf", "shell", "whistle", "stick", "rope", "spoon", "brush"],
    "COLORS": corpus.COLORS + ["black", "brown", "gold", "silver", "violet", "tan", "navy", "teal"],
    "PLACES": corpus.PLACES + ["the zoo", "the pond", "the woods", "the field", "the market", "the school", "the yard",
                               "the square"],
}
PIECES_CAST = {  # as wide, and not one word the shipped tokenizer has seen whole
    "GIRLS": WIDE_CAST["GIRLS"][8:] + ["Hazel", "Iris", "Julia", "Stella", "Clara", "Daisy", "Hannah", "Olivia"],
    "BOYS": WIDE_CAST["BOYS"][8:] + ["Oscar", "Hugo", "Felix", "Theo", "Henry", "Oliver", "Jasper", "Milo"],
    "THINGS": [w for w in WIDE_CAST["THINGS"][10:] if w not in ("train", "stick")]
    + ["kettle", "ladder", "pencil", "trumpet", "lantern", "button", "ribbon", "feather", "marble", "blanket", "pillow",
       "crown"],
    "COLORS": WIDE_CAST["COLORS"][8:] + ["crimson", "amber", "ivory", "olive", "coral", "beige", "indigo", "maroon"],
    "PLACES": [p for p in WIDE_CAST["PLACES"][8:] if p != "the market"]
    + ["the cave", "the bridge", "the orchard", "the harbour", "the island", "the valley", "the playground",
       "the library", "the tower"],
}
CASTS = {"wide": WIDE_CAST, "pieces": PIECES_CAST}


@contextmanager
def cast_lists(cast: str):
    """The corpus generator and the story checker read these lists; swap `cast`'s in, in place, for the block."""
    saved = {name: list(getattr(corpus, name)) for name in WIDE_CAST}
    for name, words in CASTS.get(cast, {}).items():
        getattr(corpus, name)[:] = words
    try:
        yield
    finally:
        for name, words in saved.items():
            getattr(corpus, name)[:] = words


class Blocks(torch.utils.data.Dataset):
    """`(input_ids, labels)` rows of a fixed tensor of blocks."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.blocks[i], self.blocks[i].clone()


def bos_aligned(stream: np.ndarray, bos_id: int, seq: int) -> Blocks:
    """Blocks that start at a document's bos: whole documents while they fit, the rest filled with the beginning of
    the next one, which then starts the next block whole (a document longer than a block is cut)."""
    starts = np.flatnonzero(stream == bos_id).tolist() + [len(stream)]
    docs = [stream[a:b][:seq].tolist() for a, b in zip(starts, starts[1:])]
    blocks, block = [], []
    for doc in docs:
        if len(block) + len(doc) > seq:
            blocks.append(block + doc[:seq - len(block)])
            block = []
        block += doc
        if len(block) == seq:
            blocks.append(block)
            block = []
    return Blocks(torch.tensor(blocks, dtype=torch.long))


def run(cast: str, tokenizer: str, align: str, steps: int, batch: int, lr: float, min_lr_ratio: float,
        n_kv_heads: int, seed: int, eval_every: int) -> dict:
    """Pretrain chapter 08's model with the given knobs; return its row."""
    with cast_lists(cast), tempfile.TemporaryDirectory() as d:
        tok = train_tokenizer(builtin_texts(seed)) if tokenizer == "retrained" else load_tokenizer()
        world, seq = corpus.make_world(seed), 128
        blocks = PretrainDataset(corpus.write_builtin_dataset(d, seed=seed)["pretrain"], tok, seq, cache_dir=d)
        if align == "bos":
            blocks = bos_aligned(np.asarray(blocks.tokens), tok.bos_id, seq)
        train, val = split_train_val(blocks, 64)
        seed_everything(0)
        model = LLM(LLMconfig(vocab_size=tok.vocab_size, dim=128, n_layers=4, n_heads=4, n_kv_heads=n_kv_heads,
                              max_seq_len=seq))
        cfg = TrainConfig(batch_size=batch, epochs=100, learning_rate=lr, warmup_iters=20, max_steps=steps,
                          min_lr_ratio=min_lr_ratio, eval_interval=eval_every)
        start = time.perf_counter()
        history = Trainer(model, train, cfg, val_data=val, metrics={"copy": lambda m: copy_probability(m, tok)}).fit()
        seconds = time.perf_counter() - start
        probe = probe_accuracy(model, tok, probe_items(world))["all"]
        stories = ["Once upon a time" + s for s in
                   sample_replies(model, tok, [[tok.bos_id] + tok.encode("Once upon a time")] * 64, 120)]
        problems = Counter(p.split(":")[0] for s in stories for p in story_problems(s))
        consistent = story_consistency(stories)
    copying = [{"step": r["step"], **{k: round(v, 3) for k, v in r["copy"].items()}} for r in history if "copy" in r]
    return {"cast": cast, "tokenizer": tokenizer, "align": align, "steps": steps, "batch": batch, "lr": lr,
            "min_lr_ratio": min_lr_ratio, "n_kv_heads": n_kv_heads, "seed": seed, "vocab": tok.vocab_size,
            "seconds": round(seconds, 1), "load": round(os.getloadavg()[0], 2), "threads": torch.get_num_threads(),
            "copying": copying, "probe": round(probe, 4), "stories": consistent,
            "problems": dict(problems.most_common(3))}


def _knobs(r: dict) -> str:
    """What the row changed from chapter 08's run."""
    default = {"cast": "builtin", "tokenizer": "shipped", "align": "stream", "steps": 900, "batch": 16, "lr": 4e-3,
               "min_lr_ratio": 0.1, "n_kv_heads": 2, "seed": 0}
    changed = [f"{k} {r[k]}" if k != "cast" else f"{r[k]} cast" for k in default if r[k] != default[k]]
    return ", ".join(changed) or "chapter 08's run"


def table(path: Path = RESULTS) -> str:
    columns = ["knobs (else chapter 08's run)", "vocab",
               "copy probability name / thing / colour half-way · at the end", "probe", "stories",
               "commonest problems", "seconds (load)"]
    cells = []
    for r in read_rows(path):
        at = {c["step"]: c for c in r["copying"]}
        copying = " · ".join(f"{at[s]['name']:.2f} / {at[s]['thing']:.2f} / {at[s]['color']:.2f}"
                             for s in (r["steps"] // 2, r["steps"]) if s in at)
        problems = ", ".join(f"{k} ({n})" for k, n in r["problems"].items())
        cells.append([_knobs(r), str(r["vocab"]), copying, f"{r['probe']:.1%}", f"{r['stories']:.0%}", problems,
                      f"{r['seconds']:.0f} ({r['load']:.1f})"])
    return markdown_table(columns, cells)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.stories", description=__doc__.split("\n\n")[0])
    p.add_argument("--cast", choices=["builtin", *CASTS], default="builtin")
    p.add_argument("--tokenizer", choices=["shipped", "retrained"], default="shipped")
    p.add_argument("--align", choices=["stream", "bos"], default="stream")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--min_lr_ratio", type=float, default=0.1)
    p.add_argument("--n_kv_heads", type=int, default=2, choices=[1, 2, 4])
    p.add_argument("--seed", type=int, default=0, help="the world's seed (the model's is 0)")
    p.add_argument("--eval_every", type=int, default=150, help="steps between copy measurements")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--table", action="store_true", help="print the collected rows and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.out))
        return
    for name in ("steps", "batch", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    row = run(args.cast, args.tokenizer, args.align, args.steps, args.batch, args.lr, args.min_lr_ratio,
              args.n_kv_heads, args.seed, args.eval_every)
    append_row(args.out, row)


if __name__ == "__main__":
    main()
