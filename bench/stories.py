"""Time to copying: what makes the in-context skill under consistent stories arrive inside the CPU budget.

`python -m bench.stories [--cast builtin|first|wide] [--tokenizer shipped|retrained] [--align stream|bos]
[--steps 1182] [--batch 16] [--seq 128] [--lr 4e-3] [--min_lr_ratio 0.1] [--n_layers 4] [--n_kv_heads 2] [--seed 0]
[--out FILE]`
pretrains chapter 08's model on the built-in corpus with one knob changed and appends one row: the copy probability
of the hero's name, the thing and the colour (chapter 07d's `copy_probability`) every `--eval_every` steps, the fact
probe, the share of 64 stories sampled from "Once upon a time" that keep their cast, and their commonest problems.

* `--cast` picks the stories' cast (chapter 07a). `builtin` is today's (`corpus.CAST`: 16 children, 10 things, 8
  colours, 8 places, every word split into pieces by the shipped tokenizer, the hero named before its kind);
  `kind-first` is the same words with "the square" for "the barn", the kind before the name ("a girl named Ava"), as
  the stories were before; `first` is the first edition's (`corpus.FIRST_CAST`, as many words, each one token: the
  shipped tokenizer was trained on it; kind first); `wide` is the first edition's words and twice as many new ones,
  most of them split; `wide-pieces` is as wide, every word split (both kind first).
* `--tokenizer retrained` trains a tokenizer on the corpus with that cast, as `python -m zer02llm.tokenizer --train`
  does for the first edition, so that every word is one token again; `shipped` (the default) is the shipped one.
* `--align bos` cuts the token stream so that every block starts with a document (a document that does not fit is
  cut, and begins the next block whole) instead of at every `max_seq_len` tokens.

`--table` prints the rows collected so far as the markdown table of bench/README.md. Results are deterministic for
a given machine; seconds depend on how busy it is (the load average is recorded).
"""
import argparse
import dataclasses
import os
import tempfile
import time
from collections import Counter
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
WIDE_CAST = corpus.Cast(  # the first edition's cast and as many new words (most of which the tokenizer splits)
    girls=corpus.FIRST_CAST.girls + ("Ava", "Lucy", "Grace", "Chloe", "Ivy", "Rose", "Amy", "Kate", "Jane", "Sara",
                                     "Lena", "Maya", "Tess", "Alice", "Cora", "Eva"),
    boys=corpus.FIRST_CAST.boys + ("Noah", "Liam", "Eli", "Adam", "Luke", "Ryan", "Jake", "Paul", "Dan", "Joe", "Tim",
                                   "Ned", "Kai", "Ian", "Rex", "Ross"),
    things=corpus.FIRST_CAST.things + ("lamp", "cup", "sled", "puzzle", "teddy", "robot", "train", "truck", "doll",
                                       "flute", "bell", "box", "basket", "scarf", "shell", "whistle", "stick", "rope",
                                       "spoon", "brush"),
    colors=corpus.FIRST_CAST.colors + ("black", "brown", "gold", "silver", "violet", "tan", "navy", "teal"),
    places=corpus.FIRST_CAST.places + ("the zoo", "the pond", "the woods", "the field", "the market", "the school",
                                       "the yard", "the square"),
    kind_first=True)
WIDE_PIECES_CAST = corpus.Cast(  # as wide, and no word of it whole: today's cast and three times as many more words
    girls=WIDE_CAST.girls[8:] + ("Hazel", "Iris", "Julia", "Stella", "Clara", "Daisy", "Hannah", "Olivia"),
    boys=WIDE_CAST.boys[8:] + ("Oscar", "Hugo", "Felix", "Theo", "Henry", "Oliver", "Jasper", "Milo"),
    things=tuple(w for w in WIDE_CAST.things[10:] if w not in ("train", "stick"))
    + ("kettle", "ladder", "pencil", "trumpet", "lantern", "button", "ribbon", "feather", "marble", "blanket", "pillow",
       "crown"),
    colors=WIDE_CAST.colors[8:] + ("crimson", "amber", "ivory", "olive", "coral", "beige", "indigo", "maroon"),
    places=tuple(p for p in WIDE_CAST.places[8:] if p != "the market")
    + ("the cave", "the bridge", "the orchard", "the harbour", "the island", "the valley", "the playground",
       "the library", "the tower"),
    kind_first=True)
KIND_FIRST_CAST = dataclasses.replace(  # today's cast as it was before the stories named the hero first
    corpus.CAST, places=tuple("the square" if p == "the barn" else p for p in corpus.CAST.places), kind_first=True)
CASTS = {"builtin": corpus.CAST, "first": corpus.FIRST_CAST, "wide": WIDE_CAST, "wide-pieces": WIDE_PIECES_CAST,
         "kind-first": KIND_FIRST_CAST}


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
        n_kv_heads: int, seed: int, eval_every: int, seq: int = 128, n_layers: int = 4) -> dict:
    """Pretrain chapter 08's model with the given knobs; return its row."""
    words = CASTS[cast]
    with tempfile.TemporaryDirectory() as d:
        tok = train_tokenizer(builtin_texts(seed, cast=words)) if tokenizer == "retrained" else load_tokenizer()
        world = corpus.make_world(seed)
        paths = corpus.write_builtin_dataset(d, seed=seed, cast=words)
        blocks = PretrainDataset(paths["pretrain"], tok, seq, cache_dir=d)
        if align == "bos":
            blocks = bos_aligned(np.asarray(blocks.tokens), tok.bos_id, seq)
        train, val = split_train_val(blocks, 64)
        seed_everything(0)
        model = LLM(LLMconfig(vocab_size=tok.vocab_size, dim=128, n_layers=n_layers, n_heads=4, n_kv_heads=n_kv_heads,
                              max_seq_len=seq))
        cfg = TrainConfig(batch_size=batch, epochs=100, learning_rate=lr, warmup_iters=20, max_steps=steps,
                          min_lr_ratio=min_lr_ratio, eval_interval=eval_every)
        start = time.perf_counter()
        metric = {"copy": lambda m: copy_probability(m, tok, cast=words)}
        history = Trainer(model, train, cfg, val_data=val, metrics=metric).fit()
        seconds = time.perf_counter() - start
        probe = probe_accuracy(model, tok, probe_items(world))["all"]
        stories = ["Once upon a time" + s for s in
                   sample_replies(model, tok, [[tok.bos_id] + tok.encode("Once upon a time")] * 64, 120)]
        problems = Counter(p.split(":")[0] for s in stories for p in story_problems(s, words))
        consistent = story_consistency(stories, words)
    copying = [{"step": r["step"], **{k: round(v, 3) for k, v in r["copy"].items()}} for r in history if "copy" in r]
    return {"cast": cast, "tokenizer": tokenizer, "align": align, "steps": steps, "batch": batch, "seq": seq, "lr": lr,
            "min_lr_ratio": min_lr_ratio, "n_layers": n_layers, "n_kv_heads": n_kv_heads, "seed": seed,
            "vocab": tok.vocab_size, "seconds": round(seconds, 1), "load": round(os.getloadavg()[0], 2),
            "threads": torch.get_num_threads(),
            "copying": copying, "probe": round(probe, 4), "stories": consistent,
            "problems": dict(problems.most_common(3))}


def _knobs(r: dict) -> str:
    """What the row changed from chapter 08's run."""
    default = {"cast": "builtin", "tokenizer": "shipped", "align": "stream", "steps": 1182, "batch": 16, "seq": 128,
               "lr": 4e-3, "min_lr_ratio": 0.1, "n_layers": 4, "n_kv_heads": 2, "seed": 0}
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
    p.add_argument("--cast", choices=list(CASTS), default="builtin")
    p.add_argument("--tokenizer", choices=["shipped", "retrained"], default="shipped")
    p.add_argument("--align", choices=["stream", "bos"], default="stream")
    p.add_argument("--steps", type=int, default=1182, help="two passes over world seed 0's corpus")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128, help="the context: tokens per block")
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--min_lr_ratio", type=float, default=0.1)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_kv_heads", type=int, default=2, choices=[1, 2, 4])
    p.add_argument("--seed", type=int, default=0, help="the world's seed (the model's is 0)")
    p.add_argument("--eval_every", type=int, default=150, help="steps between copy measurements")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--table", action="store_true", help="print the collected rows and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.out))
        return
    for name in ("steps", "batch", "seq", "n_layers", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    row = run(args.cast, args.tokenizer, args.align, args.steps, args.batch, args.lr, args.min_lr_ratio,
              args.n_kv_heads, args.seed, args.eval_every, args.seq, args.n_layers)
    append_row(args.out, row)


if __name__ == "__main__":
    main()
