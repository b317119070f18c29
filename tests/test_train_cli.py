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

from script_runs import ENV, kill_when

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "zer02llm" / "train.py"
TINY = ["--dim", "32", "--n_layers", "1", "--n_heads", "2", "--n_kv_heads", "1", "--max_seq_len", "64",
        "--batch_size", "4", "--accumulation_steps", "2", "--log_interval", "1", "--eval_interval", "3",
        "--eval_batches", "2", "--learning_rate", "3e-3", "--device", "cpu"]


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
    assert len(vals) == 2 and all(re.search(r"\| eval_facts \d+\.\d% \| eval_entities \d+\.\d% \| hallucination \d+\.\d%$", v)
                                  for v in vals), vals
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
    kill_when(args, tmp_path / "killed", r"step\s+6/60 \| epoch")  # the save after step 5 is on disk
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
@pytest.mark.parametrize("argv", [["--dtype", "float8"], ["--mode", "ppo"], ["--batch_size", "many"]])
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
def wandb_env(home: Path) -> dict:
    """The environment of a learner who never ran `wandb login`: no key, no WANDB_MODE, a home without .netrc."""
    env = {k: v for k, v in ENV.items() if not k.startswith("WANDB_") and k != "NETRC"}
    return {**env, "HOME": str(home)}


def wandb_summary(output: str) -> dict[str, float]:
    """The "Run summary:" table that wandb prints when a run finishes (`wandb:  lm_loss 0.33333`)."""
    table = output.split("wandb: Run summary:\n", 1)[1].split("\nwandb: \n", 1)[0]
    rows = (line.removeprefix("wandb:").split() for line in table.splitlines())
    return {key: float(value) for key, value in rows}


def last_values(history: list[dict]) -> dict[str, float]:
    """The last value the trainer logged for each key (what wandb's summary must show)."""
    return {k: v for record in history for k, v in record.items()}


def test_wandb_runs_offline_by_itself_and_records_what_to_watch(corpus, tmp_path):
    """The real wandb, in a real run, for a learner without an account: it must choose offline mode itself, never
    wait for input (stdin is closed), write its run folder, and summarise the values the trainer logged last."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data_path", str(corpus["pretrain"]), *TINY, "--max_steps",
                           "6", "--use_wandb"], cwd=tmp_path, env=wandb_env(tmp_path), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wandb: no API key configured, logging offline to ./wandb" in proc.stdout
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert len(list(run_dir.glob("run-*.wandb"))) == 1
    summary = wandb_summary(proc.stdout + proc.stderr)
    history = torch.load(tmp_path / "out" / "pretrain_32_resume.pth", weights_only=True)["history"]
    expected = last_values(history)
    for key in ("lm_loss", "lr", "grad_norm", "tokens_per_s", "val_loss"):
        assert summary[key] == pytest.approx(expected[key], rel=1e-4, abs=5e-6), key  # wandb rounds to 5 decimals


@pytest.fixture
def wandb_runs(tmp_path, monkeypatch):
    """The real wandb.init, watched: every run it creates and every record logged to it (writes under tmp_path)."""
    wandb = pytest.importorskip("wandb")
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    runs, real_init = [], wandb.init

    class Watched:  # wandb's Run refuses new attributes: wrap it, passing everything through
        def __init__(self, run):
            self.run, self.logged = run, []

        def log(self, record, **kw):
            self.logged.append(dict(record))
            return self.run.log(record, **kw)

        def __getattr__(self, name):
            return getattr(self.run, name)

    def init(**kw):
        runs.append(Watched(real_init(**kw)))
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    yield runs
    monkeypatch.delenv("WANDB_MODE", raising=False)  # start_wandb set it for the process


def test_wandb_config_holds_the_flags_and_the_model_size_and_a_resume_continues_the_run(corpus, tmp_path, wandb_runs):
    argv = ["--data_path", corpus["pretrain"], "--out_dir", tmp_path, *TINY, "--max_steps", "4", "--use_wandb",
            "--wandb_project", "test"]
    assert main([str(a) for a in argv]) == 0
    (run,) = wandb_runs
    config = dict(run.config)
    assert config["batch_size"] == 4 and config["max_steps"] == 4 and config["learning_rate"] == 3e-3
    assert config["dim"] == 32 and config["world_size"] == 1 and config["total_steps"] == 4
    assert config["parameters"] == LLM.from_checkpoint(tmp_path / "pretrain_32.pth").num_parameters()
    assert config["model_config"]["n_layers"] == 1 and run.project == "test"
    assert [r["step"] for r in run.logged] == [0, 1, 2, 3, 3, 4, 4]  # validations at 0, 3 and the end
    state = torch.load(tmp_path / "pretrain_32_resume.pth", weights_only=True)
    assert state["extra"]["wandb_run_id"] == run.id
    assert main([str(a) for a in argv + ["--resume"]]) == 0
    assert len(wandb_runs) == 2 and wandb_runs[1].id == run.id  # the same wandb run, continued


def test_wandb_logs_the_moe_balance_and_the_held_out_accuracy(corpus, pretrained, tmp_path, wandb_runs):
    argv = ["--data_path", corpus["pretrain"], "--out_dir", tmp_path, *TINY, "--max_steps", "2", "--use_wandb",
            "--use_moe", "--n_routed_experts", "4", "--num_experts_per_tok", "2"]
    assert main([str(a) for a in argv]) == 0
    steps = [r for r in wandb_runs[0].logged if "lm_loss" in r]
    assert len(steps) == 2 and all("aux_loss" in r for r in steps)
    for record in steps:
        shares = [record[f"expert_load/layer0/expert{j}"] for j in range(4)]
        assert sum(shares) == pytest.approx(1.0) and all(0 <= x <= 1 for x in shares), shares
    argv = ["--mode", "sft", "--init_from", pretrained, "--data_path", corpus["sft"], "--out_dir", tmp_path, *TINY,
            "--max_steps", "3", "--use_wandb"]
    assert main([str(a) for a in argv]) == 0
    validations = [r for r in wandb_runs[1].logged if "val_loss" in r]
    assert [r["step"] for r in validations] == [0, 3]
    assert all(0 <= r["eval_facts"] <= 1 and 0 <= r["eval_entities"] <= 1 for r in validations), validations


def test_wandb_missing_is_one_clear_error(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    argv = ["--data_path", corpus["pretrain"], "--out_dir", tmp_path, *TINY, "--max_steps", "2", "--use_wandb"]
    assert "pip install wandb" in error_of(argv, capsys)


def test_wandb_under_ddp_only_rank_0_creates_a_run(corpus, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**wandb_env(tmp_path), "PET_MASTER_PORT": str(free_port())}
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", str(SCRIPT), "--ddp", "--data_path",
                           str(corpus["pretrain"]), *TINY, "--max_steps", "2", "--use_wandb"], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    assert (proc.stdout + proc.stderr).count("wandb: Run summary:") == 1


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


# ---- every failure ends in one line and loses nothing -------------------------------------------------------
def one_error_line(proc) -> str:
    """The message of a run that failed the promised way: exit 1, one `error:` line on stderr, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (proc.returncode, proc.stderr)
    return lines[0].removeprefix("error: ")


@pytest.mark.parametrize("flag,value", [("--learning_rate", "0"), ("--learning_rate", "nan"), ("--learning_rate", "inf"),
                                        ("--grad_clip", "nan"), ("--grad_clip", "-1"), ("--weight_decay", "inf")])
def test_numbers_are_checked_before_any_work(corpus, tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    message = error_of(["--data_path", corpus["pretrain"], *TINY, "--out_dir", out, flag, value], capsys)
    assert message.startswith(flag.removeprefix("--")) and value in message, message
    assert not out.exists(), "refused before anything was written"


def test_out_dir_must_be_a_writable_folder(corpus, tmp_path, capsys):
    a_file = tmp_path / "out"
    a_file.write_text("not a folder")
    assert error_of(["--data_path", corpus["pretrain"], *TINY, "--out_dir", a_file], capsys) == (
        f"--out_dir {a_file} is a file, not a folder: pass a folder for the checkpoints\n")
    message = error_of(["--data_path", corpus["pretrain"], *TINY, "--out_dir", "/dev/null/out"], capsys)
    assert message.startswith("--out_dir /dev/null/out: cannot write checkpoints there (Not a directory)"), message
    assert "step " not in capsys.readouterr().out


@pytest.mark.parametrize("device", ["tpu", "cuda", "cuda:7"])
def test_devices_are_checked_up_front(corpus, tmp_path, device):
    if device != "tpu" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    argv = [a for a in TINY if a not in ("--device", "cpu")]
    proc = cli(SCRIPT, "--data_path", corpus["pretrain"], *argv, "--device", device, "--out_dir", tmp_path, cwd=tmp_path,
               check=False)
    assert f"device {device!r}" in one_error_line(proc) and "this machine has cpu" in proc.stderr
    if device == "cuda" and torch.cuda.is_available():
        pytest.fail("unreachable: a CUDA machine has cuda")


def _limit_file_size():
    """preexec_fn: files may not grow past 100 kB (a full disk as far as a writer can tell: the write fails with
    EFBIG instead of ENOSPC); the signal that would kill the process is ignored, so the write returns an error."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_a_full_disk_stops_with_one_line_and_keeps_the_checkpoint(corpus, tmp_path):
    args = [SCRIPT, "--data_path", corpus["pretrain"], *TINY, "--save_interval", "2"]
    cli(*args, "--max_steps", "2", cwd=tmp_path)  # the previous run's checkpoint (and the token cache)
    before = (tmp_path / "out" / "pretrain_32.pth").read_bytes()
    proc = subprocess.run([sys.executable, *map(str, args), "--max_steps", "4"], cwd=tmp_path, env=ENV, text=True,
                          capture_output=True, timeout=300, preexec_fn=_limit_file_size)
    assert one_error_line(proc) == ("cannot write out/pretrain_32.pth: the file is larger than this system allows (File "
                                    "too large); the file that was there before, if any, is intact")
    assert (tmp_path / "out" / "pretrain_32.pth").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pretrain_32.pth", "pretrain_32_resume.pth"]


def test_stale_temporary_files_of_this_run_are_removed(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".pretrain_32.pth.k3j9a_x1.tmp", out / ".pretrain_32_resume.pth.0q2w.tmp"]
    for path in stale + [out / ".sft_32.pth.k3j9a_x1.tmp"]:
        path.write_bytes(b"\0" * 1000)  # what kill -9 during a save leaves
    cli(SCRIPT, "--data_path", corpus["pretrain"], *TINY, "--max_steps", "1", cwd=tmp_path)
    assert sorted(p.name for p in out.iterdir()) == [".sft_32.pth.k3j9a_x1.tmp", "pretrain_32.pth",
                                                     "pretrain_32_resume.pth"]  # another run's names are left alone


def test_resume_refuses_another_run(corpus, tmp_path, capsys):
    args = ["--data_path", corpus["pretrain"], *TINY, "--out_dir", tmp_path, "--save_interval", "2"]
    assert main([str(a) for a in args + ["--max_steps", "4"]]) == 0
    message = error_of(args + ["--max_steps", "6", "--seed", "7", "--batch_size", "2", "--resume"], capsys)
    assert message.startswith("the resume state belongs to another run (seed 42 then, 7 now; batch_size 4 then, 2 now; "
                              "max_steps 4 then, 6 now): "), message
    grown = tmp_path / corpus["pretrain"].name
    grown.write_bytes(corpus["pretrain"].read_bytes() + b'{"text": "One more line."}\n')
    message = error_of(["--data_path", grown, *args[2:], "--max_steps", "4", "--resume"], capsys)
    size = corpus["pretrain"].stat().st_size
    assert f"data pretrain_hq.jsonl ({size:,} bytes) then, pretrain_hq.jsonl ({size + 27:,} bytes) now)" in message
    resume = tmp_path / "pretrain_32_resume.pth"
    (tmp_path / "pretrain_32.pth").replace(resume)  # a model checkpoint where the resume state belongs
    message = error_of(args + ["--max_steps", "4", "--resume"], capsys)
    assert message.startswith(f"{resume} is not a resume state (it lacks batch_in_epoch, epoch"), message


def test_bad_lines_name_file_and_line_and_can_be_skipped(corpus, tmp_path, capsys):
    data = tmp_path / "mixed.jsonl"
    lines = corpus["pretrain"].read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:2]) + '{"txt": "wrong key"}\n' + "".join(lines[2:]))
    args = ["--data_path", data, *TINY, "--out_dir", tmp_path / "out", "--max_steps", "1"]
    message = error_of(args, capsys)
    assert message.startswith(f"{data}:3:") and "--skip_bad_lines" in message, message
    assert main([str(a) for a in args + ["--skip_bad_lines"]]) == 0
    assert f"--skip_bad_lines: skipped 1 malformed line(s) of {data}" in capsys.readouterr().out


def test_lora_with_dropout_resumes_exactly_whatever_the_save_interval(corpus, pretrained, tmp_path):
    """Saving merges the adapters into a copy; building that copy must draw no random number (dropout's)."""
    args = [SCRIPT, "--mode", "sft", "--init_from", pretrained, "--data_path", corpus["sft"], *TINY, "--dropout", "0.1",
            "--lora_rank", "4", "--max_steps", "16", "--eval_files", "none"]
    runs = {}
    for name, interval in (("never", "0"), ("every5", "5")):
        (tmp_path / name).mkdir()
        runs[name] = log_lines(cli(*args, "--save_interval", interval, cwd=tmp_path / name).stdout)
    assert len(runs["never"]) > 16 and runs["never"] == runs["every5"]
    (tmp_path / "killed").mkdir()
    kill_when([*args, "--save_interval", "5"], tmp_path / "killed", r"step\s+7/16 \| epoch")  # after the step-5 save
    resumed = cli(*args, "--save_interval", "5", "--resume", cwd=tmp_path / "killed")
    assert "resumed from out/sft_32_resume.pth at step 5" in resumed.stdout
    step_of = lambda line: int(re.match(r"step\s+(\d+)", line).group(1))
    assert [line for line in log_lines(resumed.stdout) if step_of(line) > 5] == [
        line for line in runs["every5"] if step_of(line) > 5]


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)


def _torchrun(args, cwd, kill_rank_1_after=None):
    """torchrun --standalone --max-restarts 1 with 2 gloo workers; optionally kill -9 rank 1 once rank 0 has logged
    step `kill_rank_1_after` (found among torchrun's children by the RANK in their environment)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node=2", "--max-restarts=1", str(SCRIPT),
                             "--ddp", *map(str, args)], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines, killed = [], False
    for line in proc.stdout:
        lines.append(line)
        if kill_rank_1_after and not killed and re.match(rf"step\s+{kill_rank_1_after}/", line):
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            victim = next(int(pid) for pid in children if _rank_of(int(pid)) == 1)
            os.kill(victim, signal.SIGKILL)
            killed = True
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, stderr[-3000:]
    assert killed or not kill_rank_1_after, "the run finished before a worker could be killed"
    return "".join(lines)


def test_torchrun_restarts_resume_by_themselves(corpus, tmp_path):
    """kill -9 one of two workers: torchrun restarts both, they resume from the last save, and the final weights
    equal those of a run that was never interrupted."""
    args = ["--data_path", corpus["pretrain"], *TINY, "--max_steps", "24", "--save_interval", "4", "--dropout", "0.1"]
    for name in ("straight", "killed"):
        (tmp_path / name).mkdir()
    _torchrun(args, tmp_path / "straight")
    restarted = _torchrun(args, tmp_path / "killed", kill_rank_1_after=10)
    resumed_at = int(re.search(r"torchrun restart 1: resumed from out/pretrain_32_resume.pth at step (\d+)",
                               restarted).group(1))
    assert 8 <= resumed_at < 24 and resumed_at % 4 == 0
    final = lambda name: torch.load(tmp_path / name / "out" / "pretrain_32.pth", weights_only=True)["model"]
    straight, killed = final("straight"), final("killed")
    assert all(torch.equal(straight[k], killed[k]) for k in straight)


JOIN_ALONE = """
import os, sys
from datetime import timedelta
import zer02llm.train as train
train.JOIN_TIMEOUT = timedelta(seconds=3)
os.environ.update(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
try:
    train.init_distributed("cpu")
except ConnectionError as e:
    print(e)
"""


def test_a_process_that_cannot_join_stops_with_a_message(tmp_path):
    """Rank 1 of 2, and nobody at MASTER_ADDR:MASTER_PORT: it must give up with a message, not wait forever."""
    port = free_port()
    proc = subprocess.run([sys.executable, "-c", JOIN_ALONE, str(port)], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.startswith(f"rank 1 could not join the 2 processes at 127.0.0.1:{port} within 3 s ("), (
        proc.stdout, proc.stderr[-2000:])
    assert proc.stdout.rstrip().endswith("did every process start, and is the port open between the machines?")


def test_wandb_disabled_by_the_environment(corpus, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data_path", str(corpus["pretrain"]), *TINY, "--max_steps",
                           "2", "--use_wandb"], cwd=tmp_path, env={**wandb_env(tmp_path), "WANDB_MODE": "disabled"},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "wandb").exists() and "Run summary" not in proc.stdout + proc.stderr


# ---- DPO (chapter 12) ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def fine_tuned(corpus, pretrained, tmp_path_factory):
    """A tiny SFT model (the start of DPO), in its own out folder beside a copy of the pretrained one."""
    work = tmp_path_factory.mktemp("sft")
    args = ["--mode", "sft", "--init_from", pretrained, "--data_path", corpus["sft"], "--out_dir", work, *TINY,
            "--max_steps", "4", "--eval_files", "none"]
    assert main([str(a) for a in args]) == 0
    return work / "sft_32.pth"


def test_dpo_mode_trains_the_policy_from_the_sft_checkpoint(corpus, fine_tuned, capsys):
    out = fine_tuned.parent
    args = ["--mode", "dpo", "--out_dir", out, "--data_path", corpus["dpo"], *TINY, "--max_steps", "3"]
    assert main([str(a) for a in args]) == 0  # finds out/sft_32.pth from --dim
    printed = capsys.readouterr().out
    assert f"starting from {fine_tuned}" in printed and "training pairs of up to 64 tokens" in printed
    vals = [line for line in printed.splitlines() if "val loss" in line]
    assert vals and all(re.search(r"\| eval_facts \d+\.\d% \| eval_entities \d+\.\d% \| hallucination \d+\.\d%$", v)
                        for v in vals), vals
    policy = torch.load(out / "dpo_32.pth", weights_only=True)["model"]
    sft = torch.load(fine_tuned, weights_only=True)["model"]
    assert set(policy) == set(sft) and any(not torch.equal(policy[k], sft[k]) for k in sft)  # the policy alone


def test_dpo_with_lora_and_bad_dpo_flags(corpus, fine_tuned, tmp_path, capsys):
    args = ["--mode", "dpo", "--init_from", fine_tuned, "--out_dir", tmp_path, "--data_path", corpus["dpo"], *TINY,
            "--max_steps", "2", "--lora_rank", "4", "--eval_files", "none"]
    assert main([str(a) for a in args]) == 0
    adapter = torch.load(tmp_path / "dpo_32_lora.pth", weights_only=True)
    assert adapter["lora"]["rank"] == 4 and adapter["meta"]["base"] == str(fine_tuned)
    assert set(torch.load(tmp_path / "dpo_32.pth", weights_only=True)["model"]) == set(
        torch.load(fine_tuned, weights_only=True)["model"])  # merged: a plain model again
    capsys.readouterr()
    assert "--dpo_beta must be > 0" in error_of(args + ["--dpo_beta", "0"], capsys)
    assert "--dpo_beta must be > 0" in error_of(args + ["--dpo_alpha", "nan"], capsys)
    assert "--mode dpo starts from a --mode sft checkpoint" in error_of(
        ["--mode", "dpo", "--out_dir", tmp_path / "empty", "--data_path", corpus["dpo"], *TINY], capsys)


def test_dpo_kill_and_resume_reproduces_the_losses(corpus, fine_tuned, tmp_path):
    args = [SCRIPT, "--mode", "dpo", "--init_from", fine_tuned, "--data_path", corpus["dpo"], *TINY, "--dropout", "0.1",
            "--max_steps", "12", "--save_interval", "4", "--eval_files", "none"]
    for name in ("straight", "killed"):
        (tmp_path / name).mkdir()
    straight = log_lines(cli(*args, cwd=tmp_path / "straight").stdout)
    kill_when(args, tmp_path / "killed", r"step\s+6/12 \| epoch")  # the save after step 4 is on disk
    resumed = cli(*args, "--resume", cwd=tmp_path / "killed")
    assert "resumed from out/dpo_32_resume.pth at step 4" in resumed.stdout
    step_of = lambda line: int(re.match(r"step\s+(\d+)", line).group(1))
    assert [line for line in log_lines(resumed.stdout) if step_of(line) > 4] == [
        line for line in straight if step_of(line) > 4]


def test_dpo_under_torchrun_two_processes(corpus, fine_tuned, tmp_path):
    """DDP around the preference objective: the frozen reference has no gradient to reduce; one checkpoint."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**ENV, "PET_MASTER_PORT": str(free_port())}
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", str(SCRIPT), "--ddp", "--mode", "dpo", "--init_from",
                           str(fine_tuned), "--data_path", str(corpus["dpo"]), *TINY, "--max_steps", "2",
                           "--eval_files", "none"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout and proc.stdout.count("saved out/dpo_32.pth") == 1
    state = torch.load(tmp_path / "out" / "dpo_32_resume.pth", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 2
