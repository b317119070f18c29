"""The training command line (zer02llm/train.py) end to end, on a tiny model and a small built-in corpus:
the three spellings (file, module, torchrun), MoE, SFT from pretraining, LoRA, kill-and-resume, wandb, and the
errors bad input must give. The corpus and a pretrained checkpoint are made once per session."""
import os
import re
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from zer02llm.corpus import write_builtin_dataset
from zer02llm.model import LLM
from zer02llm.train import build_parser, main, resolve_data_path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "zer02llm" / "train.py"
TINY = ["--dim", "32", "--n_layers", "1", "--n_heads", "2", "--n_kv_heads", "1", "--max_seq_len", "64",
        "--batch_size", "4", "--accumulation_steps", "2", "--log_interval", "1", "--eval_interval", "3",
        "--eval_batches", "2", "--learning_rate", "3e-3", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # one thread: identical arithmetic in every run


def cli(*args, cwd, timeout=300, check=True):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def log_lines(text: str) -> list[str]:
    """The training log without the throughput (which differs run to run)."""
    return [re.sub(r" \| [\d,]+ tok/s", "", line) for line in text.splitlines() if line.startswith("step ")]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_builtin_dataset(tmp_path_factory.mktemp("dataset"), size_mb=0.2)


@pytest.fixture(scope="session")
def pretrained(corpus, tmp_path_factory):
    """`python zer02llm/train.py` (the file spelling) pretrains a tiny model."""
    work = tmp_path_factory.mktemp("pretrain")
    proc = cli(SCRIPT, "--mode", "pretrain", "--data_path", corpus["pretrain"], *TINY, "--max_steps", "6", cwd=work)
    assert "saved out/pretrain_32.pth" in proc.stdout
    return work / "out" / "pretrain_32.pth"


def test_file_spelling_writes_a_self_describing_checkpoint(pretrained):
    model = LLM.from_checkpoint(pretrained)
    assert model.config.dim == 32 and model.config.n_layers == 1 and not model.config.use_moe
    state = torch.load(pretrained.with_name("pretrain_32_resume.pth"), weights_only=True)
    assert state["step"] == 6 and state["world_size"] == 1


def test_module_spelling_with_moe_and_workers(corpus, tmp_path):
    proc = cli("-m", "zer02llm.train", "--data_path", corpus["pretrain"], *TINY, "--max_steps", "2", "--use_moe",
               "--n_routed_experts", "2", "--num_experts_per_tok", "1", "--num_workers", "1", cwd=tmp_path)
    model = LLM.from_checkpoint(tmp_path / "out" / "pretrain_32_moe.pth")
    assert model.config.use_moe and model.config.n_routed_experts == 2
    assert "step 2/2 | epoch 1 | loss" in proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_with_moe(corpus, tmp_path):
    """DDP with a mixture of experts: experts that get no token in a batch must not stall the all-reduce."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**ENV, "PET_MASTER_PORT": str(free_port())}  # torchrun reads its --master_port from PET_MASTER_PORT
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", str(SCRIPT), "--ddp", "--data_path", str(corpus["pretrain"]),
                           *TINY, "--max_steps", "4", "--save_interval", "2", "--use_moe", "--n_routed_experts", "4",
                           "--num_experts_per_tok", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout
    assert proc.stdout.count("saved out/pretrain_32_moe.pth") == 1, "only rank 0 prints and saves"
    assert len(log_lines(proc.stdout)) == len(set(log_lines(proc.stdout)))
    state = torch.load(tmp_path / "out" / "pretrain_32_moe_resume.pth", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 4 and len(state["rng"]) == 2
    assert LLM.from_checkpoint(tmp_path / "out" / "pretrain_32_moe.pth").config.use_moe


def test_sft_starts_from_the_pretrained_checkpoint(corpus, pretrained, tmp_path):
    # a vanishing learning rate: after one step the SFT model must still be the pretrained one
    args = ["--mode", "sft", "--init_from", pretrained, "--data_path", corpus["sft"], "--out_dir", tmp_path,
            *TINY, "--max_steps", "1", "--learning_rate", "1e-12"]
    assert main([str(a) for a in args]) == 0
    sft = torch.load(tmp_path / "sft_32.pth", weights_only=True)["model"]
    base = torch.load(pretrained, weights_only=True)["model"]
    assert max((sft[k] - base[k]).abs().max().item() for k in base) < 1e-8


def test_sft_default_init_path_and_lora(corpus, pretrained, capsys):
    out = pretrained.parent
    args = ["--mode", "sft", "--out_dir", out, "--data_path", corpus["sft"], *TINY, "--max_steps", "3",
            "--lora_rank", "4", "--lora_targets", "q_proj,v_proj", "--max_seq_len", "32"]
    assert main([str(a) for a in args]) == 0  # finds out/pretrain_32.pth from --dim
    printed = capsys.readouterr().out
    assert f"starting from {pretrained}" in printed and "examples of up to 32 tokens" in printed
    assert LLM.from_checkpoint(out / "sft_32.pth").config.max_seq_len == 64  # shorter training, same context
    adapter = torch.load(out / "sft_32_lora.pth", weights_only=True)
    assert adapter["lora"]["rank"] == 4 and adapter["lora"]["targets"] == ["q_proj", "v_proj"]
    assert adapter["meta"]["base"] == str(pretrained)
    assert all(k.endswith(("lora_A", "lora_B")) for k in adapter["weights"])
    merged = torch.load(out / "sft_32.pth", weights_only=True)["model"]
    base = torch.load(pretrained, weights_only=True)["model"]
    assert set(merged) == set(base)  # a plain model again
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_sft_scores_the_held_out_questions_at_each_validation(corpus, pretrained, tmp_path, capsys):
    args = ["--mode", "sft", "--init_from", pretrained, "--data_path", corpus["sft"], "--out_dir", tmp_path, *TINY,
            "--max_steps", "3"]
    assert main([str(a) for a in args]) == 0  # the question files beside the data are found
    vals = [line for line in capsys.readouterr().out.splitlines() if "val loss" in line]
    assert len(vals) == 2 and all(re.search(r"\| eval_facts \d+\.\d% \| eval_entities \d+\.\d%$", v) for v in vals), vals
    assert main([str(a) for a in args + ["--eval_files", "none"]]) == 0
    assert "eval_facts" not in capsys.readouterr().out
    own = tmp_path / "mine.jsonl"
    own.write_text('{"question": "What is 2 plus 3?", "answer": "5"}\n')
    assert main([str(a) for a in args + ["--eval_files", own]]) == 0
    assert re.search(r"\| mine \d+\.\d%$", capsys.readouterr().out.splitlines()[-2])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What is 2 plus 3?", "answer": "5"}\n{"answer": "5"}\n')
    assert f"{bad}:2:" in error_of([str(a) for a in args + ["--eval_files", bad]], capsys)
    assert "no such file" in error_of([str(a) for a in args + ["--eval_files", tmp_path / "nope.jsonl"]], capsys)


def test_kill_and_resume_reproduces_the_losses(corpus, tmp_path):
    args = [SCRIPT, "--data_path", corpus["pretrain"], *TINY, "--max_steps", "60", "--save_interval", "5"]
    for name in ("straight", "killed"):
        (tmp_path / name).mkdir()
    straight = cli(*args, cwd=tmp_path / "straight")
    victim = subprocess.Popen([sys.executable, *map(str, args)], cwd=tmp_path / "killed", env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in victim.stdout:
        if re.match(r"step\s+6/60 \| epoch", line):  # the save after step 5 is on disk
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    saved = torch.load(tmp_path / "killed" / "out" / "pretrain_32_resume.pth", weights_only=True)["step"]
    assert saved % 5 == 0 and 5 <= saved < 60
    resumed = cli(*args, "--resume", cwd=tmp_path / "killed")
    assert f"resumed from out/pretrain_32_resume.pth at step {saved}" in resumed.stdout
    step_of = lambda line: int(re.match(r"step\s+(\d+)", line).group(1))
    after = [line for line in log_lines(resumed.stdout) if step_of(line) > saved]
    assert len(after) > 50 and after == [line for line in log_lines(straight.stdout) if step_of(line) > saved]
    exact = lambda d: [{k: v for k, v in r.items() if k != "tokens_per_s"}
                       for r in torch.load(d / "out" / "pretrain_32_resume.pth", weights_only=True)["history"]]
    assert exact(tmp_path / "killed") == exact(tmp_path / "straight")  # bit-identical losses, norms, val losses


# ---- flags and defaults -------------------------------------------------------------------------------------
def test_boolean_flags_parse():
    p = build_parser()
    assert p.parse_args([]).use_moe is None  # "not given": LLMconfig's default (False), or the checkpoint's
    assert p.parse_args(["--use_moe"]).use_moe is True
    assert p.parse_args(["--use_moe", "False"]).use_moe is False
    assert p.parse_args(["--use_moe", "true", "--ddp", "0"]).ddp is False
    assert p.parse_args(["--flash_attn", "no"]).flash_attn is False
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--use_moe", "maybe"])
    assert e.value.code == 2


def test_defaults_match_the_seed():
    a = build_parser().parse_args([])
    assert (a.mode, a.batch_size, a.epochs, a.accumulation_steps, a.grad_clip, a.warmup_iters) == ("pretrain", 32, 1, 8, 1.0, 0)
    assert (a.log_interval, a.save_interval, a.wandb_project, a.out_dir, a.data_path) == (100, 100, "Zer02LLM", "out", None)


def test_default_data_path_is_generated_when_missing(tmp_path, monkeypatch):
    import zer02llm.train as train

    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "write_builtin_dataset", lambda out: calls.append(out) or write_builtin_dataset(out, size_mb=0.02))
    assert resolve_data_path("sft", None) == Path("dataset/sft_data.jsonl")
    assert calls == [Path("dataset")] and Path("dataset/pretrain_hq.jsonl").is_file()
    assert resolve_data_path("pretrain", None) == Path("dataset/pretrain_hq.jsonl") and len(calls) == 1


# ---- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--dtype", "float8"], ["--mode", "dpo"], ["--batch_size", "many"]])
def test_unknown_flag_values_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "invalid" in capsys.readouterr().err


def error_of(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert "error: " in err
    return err.split("error: ", 1)[1]


def test_bad_inputs_give_one_clear_error(corpus, pretrained, tmp_path, capsys):
    base = ["--out_dir", tmp_path, *TINY, "--max_steps", "2"]
    assert "no such file" in error_of(["--data_path", tmp_path / "missing.jsonl", *base], capsys)
    assert "--n_layers 3 but the checkpoint has 1" in error_of(
        ["--mode", "sft", "--init_from", pretrained, "--data_path", corpus["sft"], *base, "--n_layers", "3"], capsys)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(pretrained.read_bytes()[:1000])  # a truncated file
    assert "not a readable checkpoint" in error_of(["--mode", "sft", "--init_from", corrupt, "--data_path", corpus["sft"], *base], capsys)
    assert "does not exist" in error_of(["--mode", "sft", "--data_path", corpus["sft"], *base], capsys)  # no out/pretrain_32.pth
    assert "diverged" in error_of(["--data_path", corpus["pretrain"], *base, "--learning_rate", "1e30", "--max_steps", "20"], capsys)
    assert "torchrun" in error_of(["--data_path", corpus["pretrain"], *base, "--ddp"], capsys)
    assert "--lora_rank needs --mode sft" in error_of(["--data_path", corpus["pretrain"], *base, "--lora_rank", "4"], capsys)
    assert "batch_size must be at least 1" in error_of(["--data_path", corpus["pretrain"], *base, "--batch_size", "0"], capsys)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp")), "no half-written file"


def test_the_script_exits_nonzero_with_the_message(tmp_path):
    proc = cli(SCRIPT, "--data_path", tmp_path / "nope.jsonl", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: --data_path")


# ---- wandb --------------------------------------------------------------------------------------------------
def test_wandb_is_lazy_offline_without_a_key_and_explains_when_missing(corpus, tmp_path, monkeypatch, capsys):
    runs = []

    class FakeRun:
        def __init__(self, **kw):
            self.kw, self.logged, self.finished = kw, [], False
            runs.append(self)

        def log(self, record, step=None):
            self.logged.append((step, record))

        def finish(self):
            self.finished = True

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: FakeRun(**kw)))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    argv = ["--data_path", corpus["pretrain"], "--out_dir", tmp_path, *TINY, "--max_steps", "2"]
    assert main([str(a) for a in argv + ["--use_wandb", "--wandb_project", "test"]]) == 0
    assert os.environ["WANDB_MODE"] == "offline"
    (run,) = runs
    assert run.kw["project"] == "test" and run.finished and [s for s, _ in run.logged] == [0, 1, 2, 2]
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    capsys.readouterr()
    assert "pip install wandb" in error_of(argv + ["--use_wandb"], capsys)


def test_compile_flag_goes_through_compile_model(corpus, tmp_path, monkeypatch):
    """One compile entry point: `--compile` compiles the model's blocks with zer02llm.fast.compile_model (here with
    the aot_eager backend, which traces without generating code), and the run still trains and saves."""
    from zer02llm import fast, train

    calls = []

    def spy(model, **kwargs):
        calls.append(kwargs)
        return fast.compile_model(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(train, "compile_model", spy)
    monkeypatch.chdir(tmp_path)
    code = main(["--mode", "pretrain", "--data_path", str(corpus["pretrain"]), *TINY, "--max_steps", "2", "--compile"])
    assert code == 0 and calls == [{"decode": False}]
    assert LLM.from_checkpoint(tmp_path / "out" / "pretrain_32.pth").config.dim == 32
