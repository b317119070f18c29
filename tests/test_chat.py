"""The chat command (zer02llm.chat): prompt building with history, streaming equal to plain generation, the
non-interactive modes, and clear errors. A tiny untrained model is enough: the mechanics are what is tested."""
import io
import os
import subprocess
import sys

import pytest
import torch

import zer02llm.chat as chat
from zer02llm.config import LLMconfig
from zer02llm.model import LLM
from zer02llm.tokenizer import load_tokenizer
from zer02llm.utils import available_devices, seed_everything

TOK = load_tokenizer()


def tiny(max_seq_len: int = 96, vocab_size: int | None = None) -> LLM:
    seed_everything(0)
    return LLM(LLMconfig(vocab_size=vocab_size or TOK.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                         max_seq_len=max_seq_len)).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny().save_checkpoint(tmp_path_factory.mktemp("chat") / "sft_32.pth")


def test_build_prompt_keeps_system_and_recent_turns():
    msgs = [{"role": "system", "content": "Answer briefly."}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"Question number {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
    msgs.append({"role": "user", "content": "Last question?"})
    ids, kept = chat.build_prompt(TOK, msgs, max_len=1000)
    assert kept == msgs and ids == TOK.encode(TOK.apply_chat_template(msgs, add_generation_prompt=True))
    ids, kept = chat.build_prompt(TOK, msgs, max_len=80, min_answer=16)
    assert kept[0] == msgs[0] and kept[-1] == msgs[-1] and len(kept) < len(msgs) and len(ids) + 16 <= 80
    assert kept[1:] == msgs[len(msgs) - len(kept) + 1:], "the most recent turns are kept, in order"
    with pytest.raises(ValueError, match="too long"):
        chat.build_prompt(TOK, [{"role": "user", "content": "word " * 200}], max_len=64)


def test_streamed_reply_equals_greedy_generation():
    model = tiny()
    msgs = [{"role": "user", "content": "Who are you?"}]
    streamed = "".join(chat.stream_reply(model, TOK, msgs, max_new_tokens=20, temperature=0))
    ids = torch.tensor(TOK.encode(TOK.apply_chat_template(msgs, add_generation_prompt=True)))
    new = model.generate(ids, 20, temperature=0, eos_token_id=TOK.eos_id)[len(ids):].tolist()
    new = new[:new.index(TOK.eos_id)] if TOK.eos_id in new else new
    assert streamed == TOK.decode(new)


def test_stdin_mode_answers_every_line_with_history(ckpt, monkeypatch):
    seen = []
    real = chat.stream_reply

    def spy(model, tok, messages, *a, **k):
        seen.append([m["role"] for m in messages])
        return real(model, tok, messages, *a, **k)

    monkeypatch.setattr(chat, "stream_reply", spy)
    out = io.StringIO()
    status = chat.main(["--checkpoint", str(ckpt), "--system", "Be brief.", "--max_new_tokens", "5", "--seed", "1",
                        "--device", "cpu"], stdin=io.StringIO("Hi!\n\nWhat is 2 plus 3?\n/reset\nAgain?\n"), stdout=out)
    assert status == 0
    assert seen == [["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]
    assert "(history cleared)" in out.getvalue()


def test_seeded_sampling_repeats(ckpt):
    runs = []
    for _ in range(2):
        out = io.StringIO()
        chat.main(["--checkpoint", str(ckpt), "--prompt", "Tell me a story.", "--max_new_tokens", "12", "--seed", "3",
                   "--temperature", "1.0", "--top_k", "50", "--device", "cpu"], stdout=out)
        runs.append(out.getvalue())
    assert runs[0] == runs[1] and runs[0].endswith("\n")


def test_bad_input_exits_1_with_a_message(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 100)
    other_vocab = tiny(vocab_size=100).save_checkpoint(tmp_path / "other.pth")
    cases = [(["--checkpoint", str(tmp_path / "missing.pth")], "no checkpoint file"),
             (["--checkpoint", str(bad)], "not a readable checkpoint"),
             (["--checkpoint", str(other_vocab)], "another tokenizer"),
             (["--checkpoint", str(ckpt), "--temperature", "-1"], "temperature"),
             (["--checkpoint", str(ckpt), "--top_p", "1.5"], "top_p"),
             (["--checkpoint", str(ckpt), "--max_new_tokens", "0"], "max_new_tokens")]
    for argv, message in cases:
        assert chat.main(argv + ["--prompt", "hi"], stdout=io.StringIO()) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
    assert chat.main(["--checkpoint", str(tiny(max_seq_len=32).save_checkpoint(tmp_path / "short.pth")),
                      "--prompt", "word " * 100], stdout=io.StringIO()) == 1
    assert "too long" in capsys.readouterr().err


def test_command_line_prompt_and_pipe(ckpt):
    run = lambda *args, **kw: subprocess.run([sys.executable, "-m", "zer02llm.chat", "--checkpoint", str(ckpt),
                                              "--max_new_tokens", "6", "--device", "cpu", *args],
                                             capture_output=True, text=True, timeout=120, **kw)
    once = run("--prompt", "Who are you?", "--temperature", "0")
    assert once.returncode == 0 and once.stdout.endswith("\n"), once.stderr
    piped = run("--temperature", "0", input="Who are you?\nWhat is 1 plus 1?\n")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith(once.stdout) and len(piped.stdout) > len(once.stdout)  # then the second answer


def _chat(ckpt, *args, **kw) -> subprocess.CompletedProcess:
    """python -m zer02llm.chat in a real process (bytes in and out: some tests send bytes that are not UTF-8)."""
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw}
    return subprocess.run([sys.executable, "-m", "zer02llm.chat", "--checkpoint", str(ckpt), "--max_new_tokens", "6",
                           "--temperature", "0", *args], timeout=120, **kw)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.decode("utf-8", "replace")
    lines = err.splitlines()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "unknown device 'tpu': this machine has cpu"),
    (["--device", "cuda"], "device 'cuda' is not available here: this machine has cpu"),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", " \t "], "--prompt is empty"),
])
def test_bad_arguments_are_one_error_line_before_loading(tmp_path, args, message):
    if "cuda" in args and "cuda" in available_devices():
        pytest.skip("this machine has CUDA")
    proc = _chat(tmp_path / "missing.pth", "--prompt", "hi", *args)  # the checkpoint would be the next complaint
    assert message in _one_error_line(proc)


def test_text_that_is_not_utf8_is_answered_with_replacement_characters(ckpt):
    answers = []
    for prompt in ("caf\udce9", "caf\ufffd"):  # b"caf\xe9" as Python's argv holds it; what it should become
        out = io.StringIO()
        assert chat.main(["--checkpoint", str(ckpt), "--max_new_tokens", "6", "--temperature", "0", "--device", "cpu",
                          "--prompt", prompt], stdout=out) == 0
        answers.append(out.getvalue())
    assert answers[0] == answers[1]
    runs = [_chat(ckpt, "--device", "cpu", "--prompt", b"caf\xe9"),
            _chat(ckpt, "--device", "cpu", input=b"caf\xe9\n"),  # stdin decoded with surrogateescape (UTF-8 mode)
            _chat(ckpt, "--device", "cpu", input=b"caf\xe9\n", env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})]
    for run in runs:
        assert run.returncode == 0 and run.stderr == b"", run.stderr.decode("utf-8", "replace")
        assert run.stdout == runs[0].stdout and run.stdout.endswith(b"\n")


def test_closed_pipe_ends_quietly_with_the_sigpipe_status(ckpt):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first word: like `| head -c 0`
    try:
        proc = _chat(ckpt, "--device", "cpu", "--prompt", "Tell me a story.", stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == b"", proc.stderr.decode("utf-8", "replace")
