"""The benchmark suite: zer02llm against Hugging Face transformers at identical configs with identical weights.

python -m bench                 # full CPU suite (< 10 min on 2 cores) + the GPU variant where CUDA exists
python -m bench --quick         # smoke run on a tiny config (seconds): keeps the harness from rotting
python -m bench --only decode,context --rounds 7 --no-compile

Every benchmark runs in this one process, the implementations alternating round-robin after a warm-up; the table
shows medians and the ratio to transformers. Peak memory is measured in a fresh process per implementation.
"""
import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see README "Threads"

import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench import models, report  # noqa: E402
from bench.tasks import (COMPILED, FAST, HF, OURS, SFTStep, TrainStep, check_first_losses, context_fns,  # noqa: E402
                         decode_fns)
from bench.timing import median, round_robin  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALL = ("train", "moe", "sft", "decode", "context", "memory", "gpu")
TARGETS = {  # the issues' targets, × transformers
    "train": {OURS: 1.0, COMPILED: 1.1}, "moe": {OURS: 1.15, COMPILED: 1.25},
    "decode": {OURS: 1.2, FAST: 1.6, COMPILED: 2.0}, "memory": {OURS: 1.0, FAST: 1.0},
}


def machine_info() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    import transformers

    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python -m bench " + " ".join(sys.argv[1:])}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def compiled_copy(model, log, training: bool):
    """A copy of our model through the optional compiled path (zer02llm.fast): its blocks for training, the lean
    one-token step of `fast.generate` for decoding (the prompt pass of a call is too short to repay compiling it)."""
    try:
        from zer02llm import fast
    except ImportError:
        log("    (no zer02llm.fast: compiled path skipped)")
        return None
    return fast.compile_model(models.clone(model), blocks=training, decode=not training)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny configs, 2 rounds, no compile: a smoke run")
    ap.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per benchmark (default 5, quick 2)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="also time the optional torch.compile path (default: on, off with --quick)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results, quick: a temp folder)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for training (default: torch's, = cores)")
    ap.add_argument("--decode-threads", type=int, default=1, help="torch threads while decoding batch 1 (default 1)")
    ap.add_argument("--gpu-peak-tflops", type=float, default=None, help="device peak (bf16 dense) for MFU, if not in the table")
    args = ap.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = sorted(set(args.only) - set(ALL))
    if bad:
        ap.error(f"unknown benchmark(s) {bad}; choose from {ALL}")
    q = args.quick
    args.rounds = args.rounds or (2 if q else 5)
    args.compile = (not q) if args.compile is None else args.compile
    if args.out is None:
        args.out = models.workdir() / "results" if q else ROOT / "bench" / "results"
    args.dense, args.moe_cfg = (models.TINY, models.TINY_MOE) if q else (models.DENSE, models.MOE)
    args.batch, args.seq = (2, 32) if q else (8, 256)
    args.sft_len = 64 if q else 512  # the trainer's default max_seq_len
    args.prompt, args.new_tokens = (8, 16) if q else (32, 256)
    args.contexts, args.context_tokens = ((8, 32), 6) if q else ((64, 256, 1024), 16)
    args.targets = {} if q else TARGETS  # the targets are for the real configurations
    args.max_seq_len = max(max(args.contexts) + args.context_tokens + 8, args.prompt + args.new_tokens, args.seq)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")  # compile chatter on stderr
    if args.threads:
        torch.set_num_threads(args.threads)
    train_threads = torch.get_num_threads()
    t_start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t_start:4.0f} s] {msg}", flush=True)
    info = machine_info()
    info.update(train_threads=train_threads, decode_threads=args.decode_threads, rounds=args.rounds, quick=args.quick,
                load_before=load())
    log(f"bench: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, transformers {info['transformers']}; "
        f"load average {info['load_before']}")
    work = models.workdir()
    rows: list[dict] = []
    need_dense = {"train", "decode", "context", "memory"} & set(args.only)
    dense = models.make_pair(args.dense, args.max_seq_len, work) if need_dense else None
    moe = models.make_pair(args.moe_cfg, args.max_seq_len, work) if {"moe", "memory"} & set(args.only) else None
    for name, pair in (("dense", dense), ("moe", moe)):
        if pair is not None:
            log(f"  {name}: {type(pair.hf).__name__}, {pair.ours.num_parameters() / 1e6:.1f} M parameters, "
                f"max |logits ours - transformers| = {pair.max_abs_logit_diff:.1e}")

    for key, pair, label in (("train", dense, "dense"), ("moe", moe, "MoE 4 experts top-2")):
        if key not in args.only:
            continue
        log(f"[{key}] training step, batch {args.batch} x {args.seq}, fp32, {train_threads} threads")
        torch.manual_seed(1)
        ids = torch.randint(0, pair.ours.config.vocab_size, (args.batch, args.seq))
        impls = {HF: models.clone(pair.hf), OURS: models.clone(pair.ours)}
        if args.compile and (c := compiled_copy(pair.ours, log, training=True)) is not None:
            impls[COMPILED] = c
        fns = {k: TrainStep(m, ids, hf_moe=(k == HF and key == "moe")) for k, m in impls.items()}
        for k in (HF, OURS):
            fns[k].warm_up()  # one sequence; the compiled copy warms up (and compiles) on the real batch
        values = round_robin(fns, args.rounds, warmup={HF: 0, OURS: 0, COMPILED: 1}, log=log)
        # same initial weights -> same first loss (MoE: transformers' aux loss is batch-level, ours per sequence)
        same = check_first_losses(fns, [HF, OURS, COMPILED] if key == "train" else [OURS, COMPILED], atol=1e-4)
        log(f"    first losses agree: {same}")
        rows.append(report.row(f"train {label} (fwd+bwd+AdamW)", "tokens/s", values, True, args.targets.get(key),
                               note=f"first losses: {same}"))
        del impls, fns

    if "sft" in args.only:
        rows.append(sft_row(args, log, train_threads))

    if {"decode", "context"} & set(args.only):
        torch.set_num_threads(args.decode_threads)
        impls = {HF: dense.hf, OURS: dense.ours, FAST: dense.ours}
        if args.compile and (c := compiled_copy(dense.ours, log, training=False)) is not None:
            impls[COMPILED] = c.eval()
        if "decode" in args.only:
            log(f"[decode] batch 1, {args.prompt}-token prompt, {args.new_tokens} new tokens, greedy, "
                f"{args.decode_threads} thread(s)")
            prompt = torch.randint(0, dense.ours.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(2))
            fns, outputs = decode_fns(impls, prompt, args.new_tokens)
            values = round_robin(fns, args.rounds, warmup=1, log=log)
            for k, out in outputs.items():  # the same tokens, or the comparison means nothing
                if not torch.equal(out, outputs[HF]):
                    n = int((out != outputs[HF]).int().argmax())
                    raise AssertionError(f"{k} generated different tokens than transformers (first at position {n})")
            log(f"    identical tokens: {', '.join(outputs)}")
            rows.append(report.row(f"decode B1 {args.prompt}+{args.new_tokens} greedy", "tokens/s", values, True,
                                   args.targets.get("decode"), note="identical tokens asserted"))
        if "context" in args.only:
            eager_impls = {k: v for k, v in impls.items() if k != COMPILED}  # the eager paths: within the time budget
            for ctx in args.contexts:
                log(f"[context] decode cost per token at context {ctx}")
                prompt = torch.randint(0, dense.ours.config.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(3))
                values = round_robin(context_fns(eager_impls, prompt, args.context_tokens), args.rounds,
                                     warmup=0 if "decode" in args.only else 1, log=log)  # warm from [decode]
                rows.append(report.row(f"decode @ context {ctx}", "ms/token", values, False))
        del impls
        torch.set_num_threads(train_threads)

    if "memory" in args.only:
        tasks = [("train", dense, "dense"), ("train", moe, "MoE"), ("decode", dense, "dense")]
        if args.quick:
            tasks = tasks[2:]
        log(f"[memory] peak RSS: {len(tasks)} tasks x {{{HF}, {OURS}}} (decode: also {FAST}), one fresh process each, "
            "all at once")
        details = memory_runs([(task, pair) for task, pair, _ in tasks], args)  # a peak does not depend on speed
        for (task, pair, label), detail in zip(tasks, details):
            values = {impl: [d["peak_rss_mb"]] for impl, d in detail.items()}
            for impl, d in detail.items():
                log(f"    {task} {label}, {impl}: {d}")
            what = f"{args.batch}x{args.seq} train step" if task == "train" else f"decode {args.prompt}+{args.new_tokens}"
            task_peaks = ", ".join(f"{k} {v['task_peak_mb']:.0f} MB" for k, v in detail.items() if v.get("task_peak_mb"))
            rows.append(report.row(f"peak RSS {label} {what}", "MB", values, False, args.targets.get("memory"),
                                   note=f"process peak (imports + loading + task); during the task alone: {task_peaks}"))

    if "gpu" in args.only:
        rows += gpu_rows(args, log)

    info.update(load_after=load(), wall_s=round(time.perf_counter() - t_start, 1))
    header = (f"zer02llm vs transformers {info['transformers']} (torch {info['torch']}), {info['cpu']}, {info['cores']} cores; "
              f"{info['date']}\nthreads: training {train_threads}, decoding {args.decode_threads}, OMP_WAIT_POLICY="
              f"{info['OMP_WAIT_POLICY']} (both implementations alike); medians of {args.rounds} round-robin rounds; "
              f"load average before {info['load_before']}, after {info['load_after']}; total {info['wall_s']:.0f} s")
    text = report.table(rows, header)
    paths = report.write(args.out, rows, info, text)
    log("\n" + text)
    log(f"\nresults: {', '.join(str(p) for p in paths.values())}")
    return rows


def memory_runs(tasks: list[tuple[str, models.Pair]], args) -> list[dict[str, dict]]:
    """One fresh `python -m bench.memory` process per (task, implementation), all started together; for each task,
    the JSON results of every implementation (decoding: the default and the fast path of ours)."""
    procs = []
    for t, (task, pair) in enumerate(tasks):
        for impl in ((HF, OURS, FAST) if task == "decode" else (HF, OURS)):
            cmd = [sys.executable, "-m", "bench.memory", "--impl", impl, "--task", task, "--hf-dir", str(pair.hf_dir),
                   "--ckpt", str(pair.ckpt), "--batch", str(args.batch), "--seq", str(args.seq), "--prompt", str(args.prompt),
                   "--new-tokens", str(args.new_tokens), "--decode-threads", str(args.decode_threads)]
            if pair.ours.config.use_moe:
                cmd.append("--moe")
            procs.append((t, impl, cmd,
                          subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)))
    results: list[dict[str, dict]] = [{} for _ in tasks]
    for i, impl, cmd, proc in procs:
        out, err = proc.communicate(timeout=900)
        if proc.returncode:
            raise RuntimeError(f"memory worker failed ({' '.join(cmd)}):\n{err[-3000:]}")
        results[i][impl] = json.loads(out.strip().splitlines()[-1])
    return results


def sft_row(args, log, threads: int) -> dict:
    """SFT steps on the built-in conversations, real tokens/s: every example padded to max_seq_len (how the trainer
    batched before) against each batch padded to its longest example (`SFTDataset.collate`), same model, same run."""
    from zer02llm.corpus import write_builtin_dataset
    from zer02llm.data import SFTDataset
    from zer02llm.tokenizer import load_tokenizer

    from zer02llm.config import LLMconfig
    from zer02llm.model import LLM

    tok = load_tokenizer()
    sft = SFTDataset(write_builtin_dataset(models.workdir() / "dataset", size_mb=0.05)["sft"], tok, args.sft_len)
    torch.manual_seed(0)
    model = LLM(LLMconfig(**{**args.dense, "vocab_size": tok.vocab_size}, max_seq_len=args.sft_len))
    batches = [list(range(i * args.batch, (i + 1) * args.batch)) for i in range(4)]
    mean = sum(len(sft[i][0]) for b in batches for i in b) / (4 * args.batch)
    log(f"[sft] SFT step, batch {args.batch}, conversations of {mean:.0f} tokens on average, fp32, {threads} threads")
    before, after = f"padded to {args.sft_len}", "padded per batch"
    fns = {before: SFTStep(models.clone(model), sft, batches, pad_to=args.sft_len),
           after: SFTStep(models.clone(model), sft, batches)}
    values = round_robin(fns, args.rounds, warmup=1, log=log)
    gain = median(values[after]) / median(values[before])
    log(f"    {before} {median(values[before]):.0f}, {after} {median(values[after]):.0f} real tokens/s: {gain:.2f}x")
    return report.row(f"train SFT B{args.batch} (fwd+bwd+AdamW)", "real tok/s", {OURS: values[after]}, True,
                      note=f"{before} (before): {median(values[before]):.1f} real tokens/s; {after}: "
                           f"{median(values[after]):.1f}; speed-up {gain:.2f}x", show_note=True)


PEAK_BF16_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10G": 70,
                    "A10": 125, "RTX 4090": 165, "RTX 3090": 71}


def gpu_rows(args, log) -> list[dict]:
    """bf16 on a larger config: training tokens/s and MFU (achieved FLOP/s ÷ the device's peak), decode tokens/s."""
    if not torch.cuda.is_available():
        log("[gpu] skipped: no CUDA device")
        return []
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak = args.gpu_peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    cfg = models.TINY if args.quick else models.GPU
    batch, seq = (2, 64) if args.quick else (16, 1024)
    pair = models.make_pair(cfg, max(seq, args.prompt + args.new_tokens), models.workdir())
    rows = []
    log(f"[gpu] {name}: training, batch {batch} x {seq}, bf16 autocast")
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device=dev)
    impls = {HF: models.clone(pair.hf).to(dev), OURS: models.clone(pair.ours).to(dev)}
    if args.compile and (c := compiled_copy(pair.ours, log, training=True)) is not None:
        impls[COMPILED] = c.to(dev)
    fns = {k: TrainStep(m, ids, autocast_dtype=torch.bfloat16) for k, m in impls.items()}
    values = round_robin(fns, max(args.rounds, 10), warmup={HF: 2, OURS: 2, COMPILED: 3}, log=log)
    rows.append(report.row(f"GPU train bf16 {batch}x{seq}", "tokens/s", values, True))
    if peak:
        fpt = models.flops_per_token(pair.ours.config, seq)
        mfu = {k: [v * fpt / (peak * 1e12) * 100 for v in vs] for k, vs in values.items()}
        rows.append(report.row(f"GPU train MFU (peak {peak} TFLOP/s)", "% MFU", mfu, True))
    del impls, fns
    log("[gpu] decoding, batch 1, bf16 weights")
    impls = {HF: models.clone(pair.hf).to(dev, torch.bfloat16).eval(), OURS: models.clone(pair.ours).to(dev, torch.bfloat16).eval()}
    if args.compile and (c := compiled_copy(pair.ours, log, training=False)) is not None:
        impls[COMPILED] = c.to(dev, torch.bfloat16).eval()
    prompt = torch.randint(0, cfg["vocab_size"], (1, args.prompt), device=dev)
    fns, outputs = decode_fns(impls, prompt, args.new_tokens)
    values = round_robin(fns, args.rounds, warmup=1, log=log)
    same = {k: float((o == outputs[HF]).float().mean()) for k, o in outputs.items()}  # bf16 rounding may differ
    rows.append(report.row(f"GPU decode bf16 B1 {args.prompt}+{args.new_tokens}", "tokens/s", values, True,
                           note=f"token agreement with transformers: {same}"))
    return rows


if __name__ == "__main__":
    main()
