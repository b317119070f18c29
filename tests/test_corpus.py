"""The built-in corpus (zer02llm.corpus): determinism, consistency, no eval leak into SFT, JSONL errors, downloads
(with the network call replaced by local files)."""
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zer02llm import corpus
from zer02llm.corpus import (COLORS, FILES, QUESTIONS, STATEMENTS, THINGS, JsonlError, check_conversation, check_text,
                             iter_jsonl, make_story, make_world, write_builtin_dataset, write_jsonl)

SIZE_MB = 0.4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    paths = write_builtin_dataset(out, seed=0, size_mb=SIZE_MB)
    read = lambda p: [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]
    return paths, {k: read(p) for k, p in paths.items()}


def _word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text) is not None


def test_files_and_schemas(built):
    paths, data = built
    assert set(paths) == {"pretrain", "sft", "eval", "eval_entities"}
    assert {k: p.name for k, p in paths.items()} == FILES
    assert all(check_text(r) is None for r in data["pretrain"])
    assert all(check_conversation(r) is None for r in data["sft"])
    for r in data["eval"] + data["eval_entities"]:
        assert set(r) == {"question", "answer", "subject", "relation"}
        assert isinstance(r["answer"], str) and re.fullmatch(r"\w+", r["answer"]), r
        assert r["subject"] in r["question"]
    size = paths["pretrain"].stat().st_size
    longest = max(len(json.dumps(r, ensure_ascii=False)) + 1 for r in data["pretrain"])
    assert SIZE_MB * 1e6 <= size < SIZE_MB * 1e6 + longest


def test_same_seed_same_bytes_other_seed_other_world(tmp_path, built):
    paths, _ = built
    again = write_builtin_dataset(tmp_path / "a", seed=0, size_mb=SIZE_MB)
    assert all(again[k].read_bytes() == paths[k].read_bytes() for k in paths)
    other = write_builtin_dataset(tmp_path / "b", seed=1, size_mb=SIZE_MB)
    assert other["pretrain"].read_bytes() != paths["pretrain"].read_bytes()
    assert make_world(0).towns != make_world(1).towns


def test_sft_mix(built):
    _, data = built
    convs = [r["conversations"] for r in data["sft"]]
    assert any(c[0]["role"] == "system" for c in convs)
    assert any(sum(m["role"] == "assistant" for m in c) >= 2 for c in convs), "no multi-turn conversation"
    assert any("Zer02LLM" in m["content"] for c in convs for m in c if m["role"] == "assistant")
    assert any(re.search(r"\d+ (plus|minus|\+|-) \d+", m["content"]) for c in convs for m in c)
    assert any(m["content"].startswith("Tell me a") for c in convs for m in c)


def _questions(data) -> list[str]:
    """Every question of the QA text: SFT user messages and the question lines of pretraining's question pages."""
    asked = [m["content"] for r in data["sft"] for m in r["conversations"] if m["role"] == "user"]
    return asked + [line for r in data["pretrain"] if r["text"].startswith("Questions about")
                    for line in r["text"].splitlines()[1:]]


@pytest.mark.parametrize("seed", [0, 1])
def test_held_out_facts_and_entities_are_stated_but_never_asked(seed, tmp_path):
    world = make_world(seed)
    paths = write_builtin_dataset(tmp_path, seed=seed, size_mb=SIZE_MB)
    data = {k: [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()] for k, p in paths.items()}
    entity_facts = [f for f in world.facts if f.subject in world.held_out_entities]
    assert len(world.held_out_entities) == 8 and len(entity_facts) == 16
    assert not world.held_out & set(entity_facts), "a held-out fact belongs to a held-out entity"
    assert len(data["eval"]) == sum(len(QUESTIONS[f.relation]) for f in world.held_out)
    assert len(data["eval_entities"]) == sum(len(QUESTIONS[f.relation]) for f in entity_facts)
    assert {(e["subject"], e["relation"], e["answer"]) for e in data["eval"]} == {
        (f.subject, f.relation, f.answer) for f in world.held_out}
    sft_text = [m["content"] for r in data["sft"] for m in r["conversations"]]
    for person in world.held_out_entities:  # not mentioned at all, in any SFT message
        assert not any(person in m for m in sft_text), person
    questions = _questions(data)
    for fact in world.held_out | set(entity_facts):
        asked = [q for q in questions if _word(q, fact.subject) and _word(q, fact.answer)]
        assert not asked, f"held-out {fact} is asked: {asked[0]!r}"
        statements = [t.format(s=fact.subject, a=fact.answer) for t in STATEMENTS[fact.relation]]
        assert any(s in r["text"] for r in data["pretrain"] for s in statements), f"{fact} never stated"
    for person in world.held_out_entities:
        assert not any(_word(q, person) for q in questions), f"{person} appears in a question"
    # the QA text does teach the question format, on the other facts
    asked = world.asked()
    assert sum(any(_word(q, f.subject) and _word(q, f.answer) for q in questions) for f in asked) > 0.9 * len(asked)


def test_pretraining_facts_are_consistent(built):
    _, data = built
    world = make_world(0)
    patterns = {"river": r"The town of (\w+) lies on the river (\w+)\.", "land": r"(\w+) is a town in the land of (\w+)\.",
                "food": r"(\w+) is famous for its (\w+)\.", "home": r"(\w+ \w+) lives in (\w+)\."}
    checked = 0
    for r in data["pretrain"]:
        for rel, pattern in patterns.items():
            for subject, answer in re.findall(pattern, r["text"]):
                attrs = world.towns.get(subject) or world.people.get(subject)
                assert attrs is not None and attrs[rel] == answer, (subject, rel, answer)
                checked += 1
    assert checked > 500


def test_stories_keep_their_cast():
    rng = random.Random(0)
    for _ in range(300):
        story, cast = make_story(rng)
        pairs = re.findall(rf"\b({'|'.join(COLORS)}) ({'|'.join(THINGS)})\b", story)
        assert pairs and all(p == (cast["color"], cast["thing"]) for p in pairs), (story, cast)
        assert cast["name"] in story and cast["place"] in story and cast["name"] != cast["friend"]
    story, cast = make_story(random.Random(1), name="Mia", color="red", thing="kite")
    assert cast["he"] == "she" and "red kite" in story and " blue kite" not in story


def _write(tmp_path, content: bytes, name="data.jsonl") -> Path:
    p = tmp_path / name
    p.write_bytes(content)
    return p


def test_iter_jsonl_offsets_and_blank_lines(tmp_path):
    lines = ['{"text": "héllo 🙂"}', "", '{"text": "second"}', "   ", '{"text": "third"}']
    p = _write(tmp_path, ("\n".join(lines) + "\n").encode("utf-8"))
    got = list(iter_jsonl(p, check_text))
    assert [g.line_no for g in got] == [1, 3, 5]
    raw = p.read_bytes()
    for g in got:
        assert json.loads(raw[g.offset:g.offset + g.length]) == g.record


@pytest.mark.parametrize("content,check,fragment", [
    (b'{"text": "ok"}\n{"text": "oops"\n', check_text, "data.jsonl:2: invalid JSON"),
    (b'{"text": "ok"}\n{"txt": "typo"}\n', check_text, "data.jsonl:2: expected an object with a 'text' key"),
    (b'{"text": 42}\n', check_text, "data.jsonl:1: 'text' must be a string"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', check_text, "data.jsonl:2: not valid UTF-8: byte 0xe9"),
    (b'[1, 2]\n', check_text, "data.jsonl:1: expected an object"),
    (b'{"text": "no conversations"}\n', check_conversation, "data.jsonl:1: expected an object with a 'conversations' key"),
    (b'{"conversations": [{"role": "robot", "content": "x"}]}\n', check_conversation, "unknown role 'robot'"),
    (b'{"conversations": [{"role": "user"}]}\n', check_conversation, "message 0 must be an object with 'role' and 'content'"),
    (b'{"conversations": [{"role": "user", "content": "hi"}]}\n', check_conversation, "no assistant message"),
    (b'{"conversations": []}\n', check_conversation, "non-empty list"),
    (b"", check_text, "the file is empty"),
    (b"\n\n  \n", check_text, "the file is empty"),
])
def test_bad_input_messages(tmp_path, content, check, fragment):
    p = _write(tmp_path, content)
    with pytest.raises(JsonlError) as info:
        list(iter_jsonl(p, check))
    assert fragment in str(info.value)
    assert str(p.parent) in str(info.value), "the message must name the file"


def test_bad_line_error_says_how_to_skip_from_python_and_the_command_line(tmp_path):
    with pytest.raises(JsonlError) as info:
        list(iter_jsonl(_write(tmp_path, b'{"text": "ok"}\nnot json\n'), check_text))
    message = str(info.value)
    assert "skip_bad_lines=True" in message and "--skip_bad_lines on the train.py command line" in message


def test_skip_bad_lines_counts(tmp_path):
    p = _write(tmp_path, b'{"text": "a"}\nnot json\n{"text": 1}\n{"text": "b"}\n\xff\n')
    skipped = []
    got = [g.record["text"] for g in iter_jsonl(p, check_text, skip_bad_lines=True, skipped=skipped)]
    assert got == ["a", "b"]
    assert [re.search(r"data\.jsonl:(\d+):", s).group(1) for s in skipped] == ["2", "3", "5"]
    only_bad = _write(tmp_path, b"x\ny\n", "bad.jsonl")
    with pytest.raises(JsonlError, match="none of its 2 lines is usable"):
        list(iter_jsonl(only_bad, check_text, skip_bad_lines=True))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(iter_jsonl(tmp_path / "nope.jsonl"))


def test_nothing_half_written(tmp_path):
    def records():
        yield {"text": "one"}
        raise RuntimeError("generator broke")

    target = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        write_jsonl(target, records())
    assert list(tmp_path.iterdir()) == []
    write_jsonl(target, [{"text": "fine"}])
    assert target.read_text(encoding="utf-8") == '{"text": "fine"}\n'
    assert oct(target.stat().st_mode & 0o777) != oct(0o600), "written files should not be private temp files"


@pytest.mark.parametrize("size_mb", [0, -1, float("nan"), float("inf")])
def test_size_must_be_positive(tmp_path, size_mb):
    with pytest.raises(ValueError, match="size_mb must be positive and finite"):
        write_builtin_dataset(tmp_path / "ds", size_mb=size_mb)
    assert not (tmp_path / "ds").exists()


def test_out_must_not_be_a_file(tmp_path):
    (tmp_path / "taken").write_text("mine\n")
    for out in (tmp_path / "taken", tmp_path / "taken" / "ds"):
        with pytest.raises(NotADirectoryError, match="taken is a file, not a folder"):
            write_builtin_dataset(out, size_mb=0.01)
    assert (tmp_path / "taken").read_text() == "mine\n"


# ---- command line and downloads (no network) ---------------------------------------------------------------------

def test_cli_build(tmp_path, capsys):
    result = corpus.main(["--out", str(tmp_path), "--size_mb", "0.05", "--seed", "3"])
    assert set(result) == set(FILES) and all(p.exists() for p in result.values())
    assert "pretrain" in capsys.readouterr().out


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--size_mb", "0"], "size_mb must be positive and finite"),
    (["--size_mb", "-1"], "got -1.0"),
    (["--size_mb", "nan"], "got nan"),
    (["--size_mb", "inf"], "got inf"),
    (["--out", "taken"], "taken is a file, not a folder"),
    (["download", "--source", "minimind", "--size_mb", "nan"], "got nan"),
    (["download", "--source", "tinystories", "--out", "taken"], "taken is a file"),
    (["download"], "download needs --source"),
])
def test_cli_bad_input_is_one_error_line_before_any_work(tmp_path, monkeypatch, capsys, fake_hub, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("mine\n")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as info:
        corpus.main(["--out", "ds", *args])
    assert info.value.code == 1 and message in _one_error_line(capsys.readouterr().err)
    assert sorted(tmp_path.rglob("*")) == before and fake_hub == [], "nothing written, nothing downloaded"


def test_cli_bad_input_in_a_real_process(tmp_path):
    (tmp_path / "taken").write_text("mine\n")
    proc = subprocess.run([sys.executable, "-m", "zer02llm.corpus", "--out", "taken"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "taken is a file" in _one_error_line(proc.stderr)


def test_module_runs_without_warnings(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "zer02llm.corpus", "--out", str(tmp_path), "--size_mb", "0.02"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"python -m zer02llm.corpus wrote to stderr: {proc.stderr}"
    assert (tmp_path / "pretrain_hq.jsonl").exists()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "TinyStoriesV2-GPT4-train.txt").write_text(
        "Once upon a time, Lily saw a cat.\nThe cat was happy.\n<|endoftext|>\nTom ran fast. He won!\n<|endoftext|>\n\n",
        encoding="utf-8")
    (hub / "TinyStoriesV2-GPT4-valid.txt").write_text(
        "Ben had a ball. He threw it high.\n<|endoftext|>\nShort.\n<|endoftext|>\n", encoding="utf-8")
    (hub / "pretrain_t2t_mini.jsonl").write_text(
        '{"text": "你好，世界。"}\n{"bad": 1}\n{"text": "second"}\n', encoding="utf-8")
    (hub / "sft_t2t_mini.jsonl").write_text(
        '{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "extra": 1}]}\n'
        '{"conversations": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
        encoding="utf-8")
    calls = []

    def fake_download(repo_id, filename):
        calls.append((repo_id, filename))
        return hub / filename

    monkeypatch.setattr(corpus, "hub_download", fake_download)
    return calls


def test_download_tinystories(tmp_path, fake_hub):
    result = corpus.main(["download", "--source", "tinystories", "--out", str(tmp_path / "ds")])
    assert [r for r, _ in fake_hub] == ["roneneldan/TinyStories"] * 2
    texts = [json.loads(line)["text"] for line in result["pretrain"].read_text(encoding="utf-8").splitlines()]
    assert texts == ["Once upon a time, Lily saw a cat.\nThe cat was happy.", "Tom ran fast. He won!"]
    convs = [json.loads(line)["conversations"] for line in result["sft"].read_text(encoding="utf-8").splitlines()]
    assert convs == [[{"role": "user", "content": "Continue this story: Ben had a ball."},
                      {"role": "assistant", "content": "He threw it high."}]]


def test_download_minimind_keeps_good_lines(tmp_path, fake_hub):
    result = corpus.download_dataset("minimind", tmp_path / "ds")
    assert result["skipped"] == {"pretrain": 1, "sft": 1}
    texts = [json.loads(line)["text"] for line in result["pretrain"].read_text(encoding="utf-8").splitlines()]
    assert texts == ["你好，世界。", "second"]
    sft = [json.loads(line) for line in result["sft"].read_text(encoding="utf-8").splitlines()]
    assert sft == [{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    corpus.download_dataset("minimind", tmp_path / "capped", size_mb=1e-6)
    assert len((tmp_path / "capped" / "pretrain_hq.jsonl").read_text(encoding="utf-8").splitlines()) == 1


def test_download_argument_errors(tmp_path, fake_hub):
    with pytest.raises(SystemExit):
        corpus.main(["download", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown source"):
        corpus.download_dataset("wikipedia", tmp_path)
    assert fake_hub == []
