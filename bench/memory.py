"""Peak resident memory of one implementation doing one task, in a fresh process.

`python -m bench.memory --impl zer02llm|"zer02llm fast"|transformers --task train|decode --hf-dir D --ckpt C [...]` prints one JSON
line. A fresh process per measurement, because the high-water mark (VmHWM in /proc/self/status) only grows, and
`ru_maxrss` would even carry over from the parent. Each process imports only its own library: ours loads our
checkpoint, transformers loads the exported folder (same weights). Reported: the process's peak (imports, loading
and the task: what a user's process needs) and the peak during the task alone (VmHWM restarted after loading)."""
import argparse
import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def proc_status_mb(field: str) -> float | None:
    """VmHWM (peak) or VmRSS (now) of this process in MB; None where /proc is missing (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so that a peak can be taken over the task alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--impl", choices=["zer02llm", "zer02llm fast", "transformers"], required=True)
    ap.add_argument("--task", choices=["train", "decode"], required=True)
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--moe", action="store_true")
    ap.add_argument("--decode-threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from bench.tasks import TrainStep, hf_generate, ours_generate

    if args.impl == "transformers":
        from bench.models import quiet_transformers

        model = quiet_transformers().AutoModelForCausalLM.from_pretrained(args.hf_dir)
    else:
        from zer02llm.model import LLM

        model = LLM.from_checkpoint(args.ckpt)
    load_peak = proc_status_mb("VmHWM")  # imports + reading the weights
    after_load = proc_status_mb("VmRSS")
    task_peak_ok = reset_peak()
    vocab = model.config.vocab_size
    torch.manual_seed(0)
    if args.task == "train":
        step = TrainStep(model, torch.randint(0, vocab, (args.batch, args.seq)), hf_moe=args.moe and args.impl == "transformers")
        for _ in range(2):  # the second step runs with the optimizer state allocated
            step()
    else:
        torch.set_num_threads(args.decode_threads)
        model.eval()
        prompt = torch.randint(0, vocab, (1, args.prompt))
        if args.impl == "transformers":
            hf_generate(model, prompt, args.new_tokens)
        else:
            ours_generate(model, prompt, args.new_tokens, lean=args.impl == "zer02llm fast")
    task_peak = proc_status_mb("VmHWM")
    result = {"peak_rss_mb": max(load_peak or 0, task_peak or 0) or None, "load_peak_mb": load_peak,
              "rss_after_load_mb": after_load, "task_peak_mb": task_peak if task_peak_ok else None}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
