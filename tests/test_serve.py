"""The OpenAI-compatible server (zer02llm.serve), driven as a client would: a real `python -m zer02llm.serve`
process on 127.0.0.1 (a port the system chooses), spoken to with the official `openai` client and plain HTTP.

Two servers per module, started together: `chat_server` serves a tiny model trained to answer eight questions with
memorised sentences (greedy answers are non-trivial text that can be compared exactly; different questions get
different answers, so interleaved tokens would show); `keyed_server` serves an untrained model with a long context,
whose greedy output never ends (it repeats a newline), behind `--api-key`: the disconnect test needs a generation
that is still running when its client goes away."""
import json
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import zer02llm.chat as chat  # noqa: E402
import zer02llm.serve as serve  # noqa: E402
from zer02llm.config import LLMconfig  # noqa: E402
from zer02llm.data import encode_sft  # noqa: E402
from zer02llm.model import LLM  # noqa: E402
from zer02llm.tokenizer import load_tokenizer  # noqa: E402
from zer02llm.utils import seed_everything  # noqa: E402

TOK = load_tokenizer()
KEY = "test-key-123"
QA = {"Who are you?": "I am Zer02LLM, a small language model trained from zero.",
      "Where does Nora live?": "Nora lives in Elmsworth, a town famous for its apples.",
      "What is 2 plus 3?": "2 plus 3 is 5.",
      "Tell me a short story.": "Once upon a time, a girl named Nora found a red kite in the garden.",
      "What colour is the sky?": "The sky is blue on a clear day.",
      "What do cats like?": "Cats like warm places and fresh fish.",
      "Name a fruit.": "An apple is a fruit.",
      "Say hello.": "Hello! How can I help you today?"}


def trained_checkpoint(path: Path) -> Path:
    """A 2-layer, 64-wide model that has memorised QA: 150 AdamW steps on one batch, about 3 s."""
    torch.set_num_threads(1)
    seed_everything(0)
    model = LLM(LLMconfig(vocab_size=TOK.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256))
    pairs = [encode_sft(TOK, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], 256)
             for q, a in QA.items()]
    longest = max(len(x) for x, _ in pairs)
    x = torch.stack([torch.cat([x, x.new_full((longest - len(x),), TOK.pad_id)]) for x, _ in pairs])
    y = torch.stack([torch.cat([y, y.new_full((longest - len(y),), -100)]) for _, y in pairs])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().save_checkpoint(path)


class Server:
    """`python -m zer02llm.serve` in a subprocess on 127.0.0.1, port 0; its output goes to a log file."""

    def __init__(self, checkpoint: Path, log: Path, *args: str):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "zer02llm.serve", "--checkpoint", str(checkpoint),
                                      "--port", "0", "--device", "cpu", *args],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 90) -> "Server":
        """Wait for the line that says where it serves; sets `url` (http://127.0.0.1:PORT)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"^serving \S+ at (http://127\.0\.0\.1:\d+) ", self.text(), re.M)
            if found:
                self.url = found.group(1)
                return self
            assert self.proc.poll() is None, f"the server exited:\n{self.text()}"
            time.sleep(0.1)
        raise TimeoutError(f"no server after {timeout} s:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                             timeout=60, **kw)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    seed_everything(0)
    endless = LLM(LLMconfig(vocab_size=TOK.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            max_seq_len=4096)).eval().save_checkpoint(folder / "endless.pth")
    return trained_checkpoint(folder / "tiny.pth"), endless, folder


@pytest.fixture(scope="module")
def servers(checkpoints):
    trained, endless, folder = checkpoints
    both = [Server(trained, folder / "chat.log"), Server(endless, folder / "keyed.log", "--api-key", KEY)]
    try:
        yield [s.wait() for s in both]
    finally:
        for s in both:
            s.stop()


@pytest.fixture(scope="module")
def chat_server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def keyed_server(servers):
    return servers[1]


def ask(client, question: str, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}], **kw)


def streamed(client, question: str, **kw) -> tuple[str, list]:
    chunks = list(ask(client, question, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_models_lists_the_checkpoint(chat_server):
    models = chat_server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].object == "model"


def test_greedy_answers_equal_the_chat_command(chat_server, checkpoints):
    question = "Where does Nora live?"
    cli = subprocess.run([sys.executable, "-m", "zer02llm.chat", "--checkpoint", str(checkpoints[0]), "--prompt",
                          question, "--temperature", "0", "--max_new_tokens", "64", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    client = chat_server.client()
    whole = ask(client, question, temperature=0, max_tokens=64)
    text, chunks = streamed(client, question, temperature=0, max_tokens=64)
    assert whole.choices[0].message.content == text == cli.stdout.removesuffix("\n") == QA[question]
    assert whole.choices[0].finish_reason == "stop" and chunks[-1].choices[0].finish_reason == "stop"
    # usage against an independent count: the prompt's tokens, and the tokens generate() makes before end-of-turn
    ids, _ = chat.build_prompt(TOK, [{"role": "user", "content": question}], 256)
    model = LLM.from_checkpoint(checkpoints[0]).eval()
    new = model.generate(torch.tensor(ids), 64, temperature=0, eos_token_id=TOK.eos_id)[len(ids):].tolist()
    assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens == new.index(TOK.eos_id)
    assert whole.usage.total_tokens == len(ids) + new.index(TOK.eos_id)
    assert whole.object == "chat.completion" and whole.model == "tiny" and whole.id.startswith("chatcmpl-")


def test_stream_is_sse_in_openai_chunk_format(chat_server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Who are you?"}], "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", chat_server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e[6:]) for e in events[:-2]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2]]
    assert len(pieces) > 5 and "".join(pieces) == QA["Who are you?"], "streamed in many pieces"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-2]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 5


def test_max_tokens_and_stop_strings(chat_server):
    client = chat_server.client()
    short = ask(client, "Who are you?", temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert QA["Who are you?"].startswith(short.choices[0].message.content)
    cut = ask(client, "Who are you?", temperature=0, stop="Zer02")
    assert cut.choices[0].message.content == "I am " and cut.choices[0].finish_reason == "stop"
    text, chunks = streamed(client, "Tell me a short story.", temperature=0, stop=["kite", "Nora"])
    assert text == "Once upon a time, a girl named " and chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats_and_equals_the_chat_command(chat_server, checkpoints, capsys):
    client = chat_server.client()
    runs = [ask(client, "Say hello.", temperature=1.5, seed=7, max_tokens=20).choices[0].message.content
            for _ in range(2)]
    streamed_run, _ = streamed(client, "Say hello.", temperature=1.5, seed=7, max_tokens=20)
    assert chat.main(["--checkpoint", str(checkpoints[0]), "--prompt", "Say hello.", "--temperature", "1.5",
                      "--top_p", "1", "--seed", "7", "--max_new_tokens", "20", "--device", "cpu"]) == 0
    assert runs[0] == runs[1] == streamed_run == capsys.readouterr().out.removesuffix("\n")


def test_eight_concurrent_streams_each_get_their_own_answer(chat_server):
    client = chat_server.client()
    alone = {q: ask(client, q, temperature=0, max_tokens=64).choices[0].message.content for q in QA}
    assert alone == QA
    barrier = threading.Barrier(len(QA))

    def together(question: str) -> str:
        barrier.wait()
        return streamed(chat_server.client(), question, temperature=0, max_tokens=64)[0]

    with ThreadPoolExecutor(len(QA)) as pool:
        answers = dict(zip(QA, pool.map(together, QA)))
    assert answers == alone
    assert ask(client, "Name a fruit.", temperature=0).choices[0].message.content == QA["Name a fruit."]


@pytest.mark.parametrize("body, param, message", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "'system', 'user' or 'assistant'"),
    ({"messages": [{"role": "user"}]}, "messages.0.content", "required"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -0.1}, "temperature", "greater than or equal"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p", "greater than 0"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, "max_tokens", "greater than or equal to 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n", "only n=1"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ""}, "stop", "non-empty"),
    ({"messages": [{"role": "user", "content": "word " * 300}]}, "messages", "too long for this model's context"),
])
def test_bad_requests_are_openai_errors(chat_server, body, param, message):
    client = chat_server.client()
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny", **body)
    error = raised.value.body
    assert raised.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and message in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}


def test_malformed_json_context_code_and_unknown_paths(chat_server):
    r = httpx.post(chat_server.url + "/v1/chat/completions", content=b'{"messages": [', timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(chat_server.url + "/v1/chat/completions", content=b'[1, 2]', timeout=30)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = httpx.post(chat_server.url + "/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "word " * 300}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.get(chat_server.url + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_long_conversation_loses_its_oldest_turns(chat_server):
    """Documented truncation (chat.build_prompt): the answer comes, usage counts the prompt that was kept."""
    turns = []
    for q, a in QA.items():
        turns += [{"role": "user", "content": q + " " + "Please. " * 8}, {"role": "assistant", "content": a}]
    messages = [{"role": "system", "content": "Be brief."}] + turns + [{"role": "user", "content": "Name a fruit."}]
    full = len(TOK.encode(TOK.apply_chat_template(messages, add_generation_prompt=True)))
    reply = chat_server.client().chat.completions.create(model="tiny", messages=messages, temperature=0)
    ids, kept = chat.build_prompt(TOK, messages, 256)
    assert full > 256 and reply.usage.prompt_tokens == len(ids) < 256 - 16 and kept[0]["role"] == "system"


def test_api_key_is_required_when_given(keyed_server):
    with pytest.raises(openai.AuthenticationError) as raised:
        keyed_server.client().models.list()
    assert raised.value.status_code == 401 and raised.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        keyed_server.client(api_key=KEY + "x").chat.completions.create(
            model="endless", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert [m.id for m in keyed_server.client(api_key=KEY).models.list().data] == ["endless"]
    assert httpx.get(keyed_server.url + "/", timeout=30).status_code == 200  # the page is static, and asks for it


def test_a_client_that_disconnects_stops_its_generation(keyed_server):
    client = keyed_server.client(api_key=KEY)
    with client.chat.completions.create(model="endless", messages=[{"role": "user", "content": "Go on."}],
                                        temperature=0, stream=True) as stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # leaving the block closes the connection
    deadline, cancelled = time.monotonic() + 20, None
    while cancelled is None and time.monotonic() < deadline:
        cancelled = re.search(r"cancelled \(client gone\) after (\d+) of at most (\d+) tokens", keyed_server.text())
        time.sleep(0.05)
    assert cancelled, f"the server did not notice the disconnect:\n{keyed_server.text()[-2000:]}"
    done, room = int(cancelled.group(1)), int(cancelled.group(2))
    assert room > 4000 and done < room // 2, (done, room)
    reply = client.chat.completions.create(model="endless", messages=[{"role": "user", "content": "hi"}],
                                           temperature=0, max_tokens=5)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5  # still serving


def _one_error(status: int, err: str) -> str:
    lines = err.splitlines()
    assert status == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_command_line_errors_come_before_serving(tmp_path, checkpoints, capsys):
    proc = subprocess.run([sys.executable, "-m", "zer02llm.serve", "--checkpoint", str(tmp_path / "missing.pth"),
                           "--port", "0"], capture_output=True, text=True, timeout=120)
    assert "no checkpoint file" in _one_error(proc.returncode, proc.stderr) and proc.stdout == ""
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        cases = [(["--port", "70000"], "--port must be in 0..65535"),
                 (["--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
                 (["--host", "no-such-host.invalid"], "cannot listen on no-such-host.invalid"),
                 (["--device", "tpu", "--port", "0"], "unknown device 'tpu'")]
        for args, message in cases:
            status = serve.main(["--checkpoint", str(checkpoints[0]), *args])
            captured = capsys.readouterr()
            assert message in _one_error(status, captured.err) and captured.out == "", (args, captured)


@pytest.mark.parametrize("pieces, stops, sent", [
    (["Hello", " there\nus", "er: hi"], ["\nuser:"], ["Hello", " there", ""]),
    (["the E", "N", "D and more"], ["END"], ["the ", "", ""]),
    (["the E", "Nd"], ["END"], ["the ", "ENd"]),
    (["abc"], [], ["abc"]),
])
def test_stop_scanner_holds_back_only_what_could_start_a_stop(pieces, stops, sent):
    scanner = serve.StopScanner(stops)
    out = [scanner.feed(p)[0] for p in pieces]
    assert out == sent
    text = "".join(pieces)
    cut = min([i for i in (text.find(s) for s in stops) if i >= 0], default=len(text))
    assert "".join(out) + (scanner.flush() if cut == len(text) else "") == text[:cut]
