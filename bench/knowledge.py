"""Time to knowledge: how much pretraining and fine-tuning the tiny world needs before the model knows it.

`python -m bench.knowledge [--cast builtin] [--seed 0] [--steps 1182] [--sft_steps 120] [--seq 128] [--batch 16]
[--lr 4e-3] [--sft_seq 64] [--out bench/results/knowledge.jsonl]` runs the course's CPU recipe (chapter 08's
pretraining, then chapter 09's full SFT) with the given knobs and appends one row: wall seconds, training tokens, the
fact probe and the share of 64 sampled stories that keep their cast after pretraining, strict accuracy on the held-out
facts and entities after SFT, and the share of consistent stories the fine-tuned model tells. `--table` prints the rows collected so far as the markdown table of bench/README.md. Accuracies are
deterministic for a given machine; seconds depend on how busy it is (the load average is recorded). `--cast` picks
the stories' cast (chapter 07a; `bench/stories.py` lists them): `first` rows were measured on the first edition. A
"–" is a number that run did not record.
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from bench.rows import append_row, markdown_table, read_rows  # noqa: E402
from bench.stories import CASTS  # noqa: E402
from zer02llm.config import LLMconfig  # noqa: E402
from zer02llm.corpus import make_world, write_builtin_dataset  # noqa: E402
from zer02llm.data import PretrainDataset, SFTDataset  # noqa: E402
from zer02llm.evaluate import (answer_accuracy, chat_prompt, probe_accuracy, probe_items, read_questions,  # noqa: E402
                               sample_replies, story_consistency)
from zer02llm.model import LLM  # noqa: E402
from zer02llm.tokenizer import load_tokenizer  # noqa: E402
from zer02llm.trainer import TrainConfig, Trainer, split_train_val  # noqa: E402
from zer02llm.utils import seed_everything  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "knowledge.jsonl"


def run(seed: int, steps: int, sft_steps: int, seq: int, batch: int, lr: float, sft_seq: int,
        cast: str = "builtin") -> dict:
    """Pretrain + SFT one model as chapters 08 and 09 do; return its row."""
    tok, world = load_tokenizer(), make_world(seed)
    with tempfile.TemporaryDirectory() as d:
        paths = write_builtin_dataset(d, seed=seed, cast=CASTS[cast])
        train, val = split_train_val(PretrainDataset(paths["pretrain"], tok, seq, cache_dir=d), 64)
        sft_train, sft_val = split_train_val(SFTDataset(paths["sft"], tok, sft_seq, cache_dir=d), 64)
        held = {"facts": read_questions(paths["eval"]), "entities": read_questions(paths["eval_entities"])}
        seed_everything(0)
        model = LLM(LLMconfig(vocab_size=tok.vocab_size, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                              max_seq_len=max(seq, 128)))
        start = time.perf_counter()
        Trainer(model, train, TrainConfig(batch_size=batch, epochs=100, learning_rate=lr, warmup_iters=20,
                                          max_steps=steps, eval_interval=0), val_data=val).fit()
        pretrain_s = time.perf_counter() - start
        probe = probe_accuracy(model, tok, probe_items(world))["all"]
        told = sample_replies(model, tok, [[tok.bos_id] + tok.encode("Once upon a time")] * 64, 120)
        seed_everything(0)
        start = time.perf_counter()
        Trainer(model, sft_train, TrainConfig(batch_size=16, epochs=100, learning_rate=5e-4, warmup_iters=10,
                                              max_steps=sft_steps, eval_interval=0), val_data=sft_val).fit()
        sft_s = time.perf_counter() - start
        scores = {k: answer_accuracy(model, tok, q).accuracy["all"] for k, q in held.items()}
        stories = sample_replies(model, tok, [chat_prompt(tok, "Tell me a short story.")] * 64, 110)
    return {"cast": cast, "seed": seed, "steps": steps, "seq": seq, "batch": batch, "lr": lr,
            "sft_steps": sft_steps, "sft_seq": sft_seq, "tokens": steps * batch * seq,
            "pretrain_s": round(pretrain_s, 1), "sft_s": round(sft_s, 1), "probe": round(probe, 4),
            "held_out_facts": round(scores["facts"], 4), "held_out_entities": round(scores["entities"], 4),
            "pretrain_stories": story_consistency(told, CASTS[cast]),
            "stories": story_consistency(stories, CASTS[cast]),
            "load": round(os.getloadavg()[0], 2), "threads": torch.get_num_threads()}


def table(path: Path = RESULTS) -> str:
    columns = ["stories' cast", "seed", "pretrain steps × batch × seq", "lr", "SFT steps (seq)", "seconds (pre + SFT)",
               "load", "probe", "stories after pretraining", "held-out facts", "held-out entities",
               "stories after SFT"]
    share = lambda r, key, fmt: "–" if r.get(key) is None else format(r[key], fmt)  # noqa: E731 (not measured: –)
    cells = [[r["cast"], str(r["seed"]), f"{r['steps']} × {r['batch']} × {r['seq']}", f"{r['lr']:g}",
              f"{r['sft_steps']} ({r['sft_seq']})", f"{r['pretrain_s']:.0f} + {share(r, 'sft_s', '.0f')}",
              f"{r['load']:.1f}", f"{r['probe']:.1%}", share(r, "pretrain_stories", ".0%"),
              f"{r['held_out_facts']:.1%}", f"{r['held_out_entities']:.1%}", share(r, "stories", ".0%")]
             for r in read_rows(path)]
    return markdown_table(columns, cells)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.knowledge", description=__doc__.split("\n\n")[0])
    p.add_argument("--cast", choices=list(CASTS), default="builtin", help="the stories' cast (bench/stories.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1182, help="two passes over world seed 0's corpus")
    p.add_argument("--sft_steps", type=int, default=120)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--sft_seq", type=int, default=64)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--table", action="store_true", help="print the collected rows and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.out))
        return
    row = run(args.seed, args.steps, args.sft_steps, args.seq, args.batch, args.lr, args.sft_seq, args.cast)
    append_row(args.out, row)


if __name__ == "__main__":
    main()
