"""The evaluation module (zer02llm.evaluate): strict scoring, baselines against a brute-force count, the probe, the
story checker against the generator's own stories and single-word corruptions, and batched generation against
one prompt at a time, and the refusal that questions about unknown entities call for."""
import json
import random
import re
from collections import Counter

import pytest
import torch
from torch import nn

from zer02llm import evaluate
from zer02llm.config import LLMconfig
from zer02llm.corpus import (CAST, FIRST_CAST, REPLIES, STATEMENTS, JsonlError, eval_sets,
                             make_story, make_world, unknown_questions)
from zer02llm.evaluate import (CANDIDATES, REFUSAL, answer_accuracy, baselines, check_statements, chat_prompt,
                               copy_probability, first_sentence, greedy_replies, hallucination_rate, is_correct,
                               is_refusal, probe_accuracy, probe_items, read_questions, sample_replies,
                               story_consistency, story_problems)
from zer02llm.model import LLM
from zer02llm.tokenizer import load_tokenizer

WORLD = make_world(0)
BRISCO = {"question": "What is Brisco famous for?", "answer": "cheese", "subject": "Brisco", "relation": "food"}
UNKNOWN = unknown_questions(0)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def small(tok):
    torch.manual_seed(0)
    return LLM(LLMconfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                         max_seq_len=160)).eval()


@pytest.mark.parametrize("reply, correct", [
    ("Brisco is famous for its cheese.", True),
    ("Brisco is famous for its cheese. Pellam is famous for its honey.", True),  # only the first sentence counts
    ("Pellam is famous for its cheese.", False),  # the wrong subject
    ("Brisco is famous for its cheese, honey and fish.", False),  # a list is not an answer
    ("Brisco is famous for its honey.", False),
    ("Brisco is famous for its cheeses.", False),  # whole words only
    ("cheese", False),  # no subject
    ("I can not answer that.", False),  # a refusal knows nothing
    ("", False),
])
def test_strict_scoring(reply, correct):
    assert is_correct(reply, BRISCO) is correct


def test_records_without_subject_or_relation_are_scored_on_what_they_have():
    assert is_correct("It is 12.", {"question": "What is 7 plus 5?", "answer": "12"})
    assert is_correct("Pellam has cheese and honey.", {"question": "?", "answer": "cheese"})
    assert not is_correct("Pellam has cheese.", {"question": "?", "answer": "cheese", "subject": "Brisco"})
    assert not is_correct(REFUSAL, {"question": "What is 7 plus 5?", "answer": "12"})


@pytest.mark.parametrize("reply, refusal", [
    ("I can not answer that.", True),
    ("  I can not answer that. Barvel lies on the river Sora.", True),  # only the first sentence counts
    ("Barvel lies on the river Sora. I can not answer that.", False),
    ("Barvel lies on the river Sora.", False),
    ("I can not answer that", False),  # the whole sentence, with its full stop
    ("I can not answer.", False),
    ("i can not answer that.", False),
    ("", False),
])
def test_is_refusal(reply, refusal):
    assert REFUSAL == "I can not answer that." and is_refusal(reply) is refusal


def test_a_question_about_an_unknown_entity_is_answered_by_the_refusal_only():
    record = UNKNOWN[0]
    invented = REPLIES[record["relation"]].format(s=record["subject"], a=CANDIDATES[record["relation"]][0])
    assert is_correct(REFUSAL, record) and not is_correct(invented, record)
    assert not any(is_correct(REFUSAL, r) for r in eval_sets(WORLD)["eval"])


def test_hallucination_rate_counts_the_replies_that_are_not_the_refusal(monkeypatch, tok, small):
    records = UNKNOWN[:5]
    invented = REPLIES[records[1]["relation"]].format(s=records[1]["subject"], a=CANDIDATES[records[1]["relation"]][0])
    replies = [REFUSAL, invented, REFUSAL + " " + invented, "", "I can not answer"]
    asked = []

    def fake(model, tokenizer, prompts, max_new_tokens=24):
        asked.extend(prompts)
        return replies

    monkeypatch.setattr(evaluate, "greedy_replies", fake)
    assert hallucination_rate(small, tok, records) == pytest.approx(3 / 5)
    assert asked == [chat_prompt(tok, r["question"]) for r in records]  # one batch, one chat turn per question
    assert answer_accuracy(small, tok, records).accuracy["all"] == pytest.approx(2 / 5)  # the same replies
    with pytest.raises(ValueError, match="at least one question"):
        hallucination_rate(small, tok, [])


def test_first_sentence():
    assert first_sentence("  Korvel lies on the river Sora. Then more.") == "Korvel lies on the river Sora."
    assert first_sentence("No stop\nsecond line") == "No stop"
    assert first_sentence("What? Yes.") == "What?"


def test_baselines_match_a_brute_force_count():
    for records in eval_sets(WORLD).values():
        got = baselines(WORLD, records)
        chance = sum(1 / len(CANDIDATES[r["relation"]]) for r in records) / len(records)
        taught = Counter((f.relation, f.answer) for f in WORLD.asked())
        majority = {}
        for rel, cands in CANDIDATES.items():  # the most taught answer; ties go to the first candidate
            best = max(taught[rel, c] for c in cands)
            majority[rel] = next(c for c in cands if taught[rel, c] == best)
        guess = sum(majority[r["relation"]] == r["answer"] for r in records) / len(records)
        assert got["chance"]["all"] == pytest.approx(chance, abs=1e-12)
        assert got["majority"]["all"] == pytest.approx(guess, abs=1e-12)
        assert 0 < got["chance"]["all"] < 0.2 and set(got["chance"]) == {r["relation"] for r in records} | {"all"}


def test_probe_items_cover_every_fact_in_its_phrasings():
    items = probe_items(WORLD)
    per_relation = {rel: sum(t.index("{s}") < t.index("{a}") for t in ts) for rel, ts in STATEMENTS.items()}
    assert len(items) == sum(per_relation[f.relation] for f in WORLD.facts)
    statements = {t.format(s=f.subject, a=f.answer) for f in WORLD.facts for t in STATEMENTS[f.relation]}
    for item in items:
        assert any(s.startswith(f"{item.prompt} {item.answer}") for s in statements), item


def test_probe_and_answers_score_what_the_model_says(monkeypatch, tok, small):
    items = probe_items(WORLD)[:30]
    monkeypatch.setattr(evaluate, "greedy_replies", lambda m, t, prompts, max_new_tokens=24: [
        f"{item.answer}." if i % 3 else "nothing" for i, item in enumerate(items)][:len(prompts)])
    acc = probe_accuracy(small, tok, items)
    assert acc["all"] == pytest.approx(sum(1 for i in range(30) if i % 3) / 30)
    records = eval_sets(WORLD)["eval"][:4]
    replies = [REPLIES[r["relation"]].format(s=r["subject"], a=r["answer"]) for r in records[:3]] + ["I do not know."]
    monkeypatch.setattr(evaluate, "greedy_replies", lambda m, t, prompts, max_new_tokens=24: replies)
    result = answer_accuracy(small, tok, records)
    assert result.correct == [True, True, True, False] and result.accuracy["all"] == 0.75


def test_batched_generation_equals_one_prompt_at_a_time(tok, small):
    questions = ["Who are you?", "What is Brisco famous for?", "Tell me a story about Mia and Tom, please."]
    prompts = [chat_prompt(tok, q) for q in questions]
    assert len(set(map(len, prompts))) == 3  # different lengths: the batch is left-padded
    batch = greedy_replies(small, tok, prompts, max_new_tokens=12)
    alone = [greedy_replies(small, tok, [p], max_new_tokens=12)[0] for p in prompts]
    assert batch == alone
    small.train()
    sampled = sample_replies(small, tok, prompts, max_new_tokens=12, seed=3)
    assert small.training, "the model's mode must be restored"
    small.eval()
    assert sampled == sample_replies(small, tok, prompts, max_new_tokens=12, seed=3)


def test_untrained_model_knows_nothing(tok, small):
    assert probe_accuracy(small, tok, probe_items(WORLD)[:60])["all"] < 0.1
    assert answer_accuracy(small, tok, eval_sets(WORLD)["eval"][:20]).accuracy["all"] == 0
    assert hallucination_rate(small, tok, UNKNOWN[:20]) == 1  # it never says the refusal either


def test_every_generated_story_is_consistent():
    rng = random.Random(0)
    stories = [make_story(rng)[0] for _ in range(2000)]
    assert story_consistency(stories) == 1.0, next(s for s in stories if story_problems(s))
    first = [make_story(rng, FIRST_CAST)[0] for _ in range(200)]  # judged by their own cast, or not stories at all
    assert story_consistency(first, FIRST_CAST) == 1.0 and story_consistency(first) == 0


def _swap(text: str, old: str, new: str) -> str:
    """Replace the LAST whole-word occurrence of `old` (the story has set the cast up by then)."""
    hits = list(re.finditer(rf"\b{re.escape(old)}\b", text))
    m = hits[-1]
    return text[:m.start()] + new + text[m.end():]


def test_single_word_corruptions_are_caught():
    rng = random.Random(1)
    for _ in range(200):
        story, cast = make_story(rng)
        other = lambda pool, *used: next(w for w in pool if w not in used)  # noqa: E731
        third = other(CAST.children, cast["name"], cast["friend"])
        corrupted = {
            "thing": _swap(story, cast["thing"], other(CAST.things, cast["thing"])),
            "colour": _swap(story, cast["color"], other(CAST.colors, cast["color"])),
            "place": _swap(story, cast["place"], other(CAST.places, cast["place"])),
            "child": _swap(story, cast["name"], third),
        }
        mentions = {k: len(re.findall(rf"\b{cast[v]}\b", story)) for k, v in
                    (("thing", "thing"), ("colour", "color"), ("place", "place"), ("child", "name"))}
        for kind, text in corrupted.items():
            if mentions[kind] > 1:  # a cast member named once has nothing to be inconsistent with
                assert story_problems(text), (kind, text)
        pronoun = {"he": "she", "his": "her", "she": "he", "her": "his"}
        found = re.search(r"\b(he|his|she|her)\b", story, flags=re.IGNORECASE)
        if found:
            word = found.group(0)
            swapped = pronoun[word.lower()]
            swapped = swapped.capitalize() if word[0].isupper() else swapped
            text = story[:found.start()] + swapped + story[found.end():]
            assert any("is called" in p for p in story_problems(text)), text


@pytest.mark.parametrize("cast", [CAST, FIRST_CAST], ids=["name first", "kind first"])
def test_the_hero_keeps_its_kind_and_is_not_its_own_friend(cast):
    rng, swapped, merged = random.Random(2), 0, 0
    for _ in range(200):
        story, picks = make_story(rng, cast)
        kid = re.search(r"\ba (girl|boy) named |, a little (girl|boy)\b", story)
        if kid:
            was = kid.group(1) or kid.group(2)
            other = "boy" if was == "girl" else "girl"
            text = story[:kid.start()] + kid.group(0).replace(was, other) + story[kid.end():]
            assert f"{picks['name']} is called a {other}" in story_problems(text, cast), text
            swapped += 1
        text = re.sub(rf"\b{picks['friend']}\b", picks["name"], story)  # the friend becomes the hero
        assert f"{picks['name']} is {picks['name']}'s own friend" in story_problems(text, cast), text
        merged += 1
    assert swapped > 20 and merged == 200


def test_non_stories_are_not_consistent():
    for text in ["", "Korvel lies on the river Sora.", "Grace had a lamp.", "12 plus 3 is 15."]:
        assert story_problems(text), text


def test_check_statements_knows_true_from_false():
    for fact in WORLD.facts:
        wrong = next(c for c in CANDIDATES[fact.relation] if c not in (fact.answer, fact.subject))
        for template in STATEMENTS[fact.relation] + [REPLIES[fact.relation]]:
            true = template.format(s=fact.subject, a=fact.answer)
            false = template.format(s=fact.subject, a=wrong)
            assert check_statements(true, WORLD) == [(true, "true")], true
            assert check_statements(false, WORLD) == [(false, f"false: {fact.answer}")], false
    assert check_statements("Mia had a red kite. Nobody lives in Atlantis.", WORLD) == [
        ("Mia had a red kite.", ""), ("Nobody lives in Atlantis.", "")]


def test_read_questions_names_the_bad_line(tmp_path):
    good = tmp_path / "q.jsonl"
    good.write_text(json.dumps(BRISCO) + "\n" + json.dumps({"question": "?", "answer": "x"}) + "\n")
    assert read_questions(good) == [BRISCO, {"question": "?", "answer": "x"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(BRISCO) + "\n" + json.dumps({"question": "no answer"}) + "\n")
    with pytest.raises(JsonlError, match=rf"{re.escape(str(bad))}:2: .*question.*answer"):
        read_questions(bad)


class _Peeking(nn.Module):
    """Puts probability `p` on the true next token (it reads it from the input) and spreads the rest evenly."""

    def __init__(self, vocab_size: int, p: float):
        super().__init__()
        self.vocab_size, self.p, self.config = vocab_size, p, LLMconfig(vocab_size=vocab_size, max_seq_len=128)
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, ids):
        probs = torch.full((*ids.shape, self.vocab_size), (1 - self.p) / self.vocab_size)
        probs[0, torch.arange(ids.shape[1] - 1), ids[0, 1:]] += self.p
        return type("Out", (), {"logits": probs.log()})


def test_copy_probability_reads_the_right_positions(tok):
    for p in (1.0, 0.5, 0.0):
        got = copy_probability(_Peeking(tok.vocab_size, p), tok, n_stories=10, cast=FIRST_CAST)
        want = p + (1 - p) / tok.vocab_size  # every word of the first edition's cast is one token
        assert set(got) == {"name", "thing", "color"} and all(abs(v - want) < 1e-5 for v in got.values()), (p, got)


def test_copy_probability_multiplies_the_pieces_of_a_word(tok):
    """Today's cast words are 2 to 6 tokens each: a word's probability is the product over its pieces."""
    pieces = [len(tok.encode(" " + w)) for w in CAST.children + CAST.things + CAST.colors]
    assert min(pieces) == 2 and max(pieces) == 6
    assert all(abs(v - 1) < 1e-5 for v in copy_probability(_Peeking(tok.vocab_size, 1.0), tok, n_stories=10).values())
    q = 0.5 + 0.5 / tok.vocab_size
    got = copy_probability(_Peeking(tok.vocab_size, 0.5), tok, n_stories=10)
    assert all(q ** 6 - 1e-6 <= v <= q ** 2 + 1e-6 for v in got.values()), got
