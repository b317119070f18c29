"""The built-in corpus (zer02llm.corpus): determinism, consistency, no eval leak into SFT, the preference pairs and
their unknown entities, JSONL errors, downloads (with the network call replaced by local files)."""
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zer02llm import corpus
from zer02llm.corpus import (CANDIDATES, CAST, FILES, FIRST_NAMES, KIND_RELATIONS, LANDS, LAST_NAMES, N_UNKNOWN,
                             QUESTIONS, REFUSAL, REPLIES, RIVERS, STATEMENTS, TOWNS, Fact, JsonlError,
                             check_conversation, check_text, iter_jsonl, make_story, make_world, preference_records,
                             reply, unknown_entities, unknown_questions, write_builtin_dataset, write_jsonl)

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
    assert set(paths) == {"pretrain", "sft", "dpo", "eval", "eval_entities", "eval_unknown"}
    assert {k: p.name for k, p in paths.items()} == FILES
    assert FILES["dpo"] == "dpo_data.jsonl" and FILES["eval_unknown"] == "eval_unknown.jsonl"
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
    assert all(other[k].read_bytes() != paths[k].read_bytes() for k in ("pretrain", "sft", "dpo", "eval_unknown"))
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
        pairs = re.findall(rf"\b({'|'.join(CAST.colors)}) ({'|'.join(CAST.things)})\b", story)
        assert pairs and all(p == (cast["color"], cast["thing"]) for p in pairs), (story, cast)
        assert cast["name"] in story and cast["place"] in story and cast["name"] != cast["friend"]
    story, cast = make_story(random.Random(1), name="Grace", color="teal", thing="lamp")
    assert cast["he"] == "she" and "teal lamp" in story and " gold lamp" not in story


# ---- preference pairs (chapter 12) and the entities the model cannot know ---------------------------------------

def _words(texts) -> set[str]:
    return {w.lower() for t in texts for w in re.findall(r"\w+", t)}


WORLD_NAMES = _words(TOWNS + RIVERS + LANDS + FIRST_NAMES + LAST_NAMES)


def _parse(text: str, templates: dict[str, list[str]]) -> tuple[str, str, str | None]:
    """(relation, subject, answer or None) of a text written from one of the templates."""
    for rel, options in templates.items():
        for t in options if isinstance(options, list) else [options]:
            pattern = re.escape(t).replace(re.escape("{s}"), r"(?P<s>[A-Z]\w+(?: [A-Z]\w+)?)").replace(
                re.escape("{a}"), r"(?P<a>\w+)")
            if m := re.fullmatch(pattern, text):
                return rel, m["s"], m.groupdict().get("a")
    raise AssertionError(f"not written from a template: {text!r}")


def test_refusal_is_six_whole_tokens():
    from zer02llm.tokenizer import load_tokenizer
    tok = load_tokenizer()
    ids = tok.encode(REFUSAL)
    assert REFUSAL == "I can not answer that." and len(ids) == 6
    assert [tok.decode([i]) for i in ids] == ["I", " can", " not", " answer", " that", "."]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_unknown_entities_share_no_word_with_the_world(seed):
    entities = unknown_entities(seed, 300)
    assert [k for k, _ in entities] == ["town", "person"] * 150  # in turn
    words = [w for _, name in entities for w in name.split()]
    assert all(len(name.split()) == (1 if kind == "town" else 2) for kind, name in entities)
    assert all(re.fullmatch(r"[A-Z][a-z]+", w) for w in words) and len(set(words)) == len(words)
    assert not {w.lower() for w in words} & WORLD_NAMES
    world = make_world(seed)
    assert not {w.lower() for w in words} & _words(list(world.towns) + list(world.people))


def test_unknown_entities_are_seeded_and_seeds_draw_other_names():
    assert unknown_entities(0, 40) == unknown_entities(0, 40) == unknown_entities(0, 200)[:40]
    names = [{w for _, name in unknown_entities(seed, N_UNKNOWN) for w in name.split()} for seed in range(4)]
    shared = max(len(a & b) for i, a in enumerate(names) for b in names[i + 1:])
    assert shared <= 0.05 * len(names[0]), shared  # a large pool of syllable names: few collisions
    with pytest.raises(ValueError, match="ran out of unknown"):
        unknown_entities(0, 10_000)


@pytest.fixture(scope="module")
def pairs(built):
    return built[1]["dpo"]


def test_preference_pairs_format(pairs):
    assert len(pairs) == 4000 and pairs == list(preference_records(make_world(0), 0))
    for r in pairs:
        assert set(r) == {"chosen", "rejected"}
        assert check_conversation({"conversations": r["chosen"]}) is None
        assert check_conversation({"conversations": r["rejected"]}) is None
        assert [m["role"] for m in r["chosen"]] == [m["role"] for m in r["rejected"]] == ["user", "assistant"]
        assert r["chosen"][0] == r["rejected"][0] and r["chosen"][1] != r["rejected"][1]


def test_preference_pairs_pass_the_dpo_reader_check(pairs):
    dpo = pytest.importorskip("zer02llm.dpo")
    assert all(dpo.check_preference(r) is None for r in pairs)


def test_preference_pairs_teach_refusal_and_keep_the_facts(pairs):
    world = make_world(0)
    unknown = dict((name, kind) for kind, name in unknown_entities(0, N_UNKNOWN))
    asked = {(f.subject, f.relation): f for f in world.asked()}
    n_unknown = refused_facts = 0
    for r in pairs:
        relation, subject, _ = _parse(r["chosen"][0]["content"], QUESTIONS)
        chosen, rejected = r["chosen"][1]["content"], r["rejected"][1]["content"]
        if subject in unknown:
            n_unknown += 1
            assert relation in KIND_RELATIONS[unknown[subject]] and chosen == REFUSAL
            rel, s, answer = _parse(rejected, REPLIES)
            assert (rel, s) == (relation, subject) and answer in CANDIDATES[relation]
        else:
            fact = asked[subject, relation]  # a KeyError here: a held-out fact or person is asked about
            assert chosen == reply(fact)
            if rejected == REFUSAL:
                refused_facts += 1
            else:
                wrong = _parse(rejected, REPLIES)[2]
                assert wrong != fact.answer and rejected == reply(Fact(subject, relation, wrong))
                assert wrong in CANDIDATES[relation]
    assert n_unknown == len(pairs) // 2
    assert 0.4 < refused_facts / (len(pairs) - n_unknown) < 0.6


def test_preference_pairs_never_mention_held_out_facts_or_people(pairs):
    world = make_world(0)
    texts = [m["content"] for r in pairs for m in r["chosen"] + r["rejected"]]
    words = _words(texts)
    for person in world.held_out_entities:
        assert not any(_word(t, person) for t in texts), person
    entity_facts = {f for f in world.facts if world.about_held_out_entity(f)}
    for fact in world.held_out | entity_facts:
        assert not any(_word(t, fact.subject) and _word(t, fact.answer) for t in texts), fact
    assert {w.lower() for f in world.asked() for w in f.subject.split()} <= words  # the other facts are there


def test_unknown_questions_ask_about_other_entities(built):
    _, data = built
    records = data["eval_unknown"]
    assert records == unknown_questions(0) and len(records) == 60
    for r in records:
        assert set(r) == {"question", "answer", "subject", "relation"} and r["answer"] == REFUSAL
        kind = "town" if len(r["subject"].split()) == 1 else "person"
        assert r["relation"] in KIND_RELATIONS[kind]
        assert r["question"] in [q.format(s=r["subject"]) for q in QUESTIONS[r["relation"]]]
    assert {r["relation"] for r in records} == set(QUESTIONS)
    eval_words = {w.lower() for r in records for w in r["subject"].split()}
    pair_words = {w.lower() for _, name in unknown_entities(0, N_UNKNOWN) for w in name.split()}
    assert not eval_words & pair_words and not eval_words & WORLD_NAMES
    assert not eval_words & _words(m["content"] for r in data["dpo"] for m in r["chosen"] + r["rejected"])
    texts = [r["text"] for r in data["pretrain"]] + [m["content"] for r in data["sft"] for m in r["conversations"]]
    seen = _words(texts)
    assert not eval_words & seen and not pair_words & seen, "an unknown name appears in the pretraining or SFT text"
    assert unknown_questions(1) != records


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
