"""RL from verifiable rewards (zer02llm.grpo): the arithmetic task and its reward, group advantages and the clipped,
KL-regularised token loss against TRL 1.16's GRPOTrainer, GRPOObjective against plain forward passes and REINFORCE,
the prompt dataset's errors, and `train.py --mode grpo` end to end (kill -9 and resume, bad flags, torchrun).
Tiny models, few steps and short replies: the file runs in about a minute on 2 CPU cores."""
import inspect
import json
import math
import os
import random
import re
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zer02llm.grpo as grpo
from zer02llm.config import LLMconfig
from zer02llm.corpus import JsonlError
from zer02llm.evaluate import chat_prompt
from zer02llm.grpo import (GRPODataset, GRPOObjective, chain_problem, check_grpo_args, final_number,
                           group_advantages, grpo_token_loss, math_reward, reduce_per_sequence, sample_group,
                           write_math_dataset)
from zer02llm.model import LLM
from zer02llm.tokenizer import load_tokenizer
from zer02llm.train import main
from zer02llm.utils import seed_everything

from script_runs import ENV, kill_when
from tiny_models import tiny_llm

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "zer02llm" / "train.py"
ATOL = 1e-5  # float32 log-probabilities of a few dozen tokens
pytestmark = pytest.mark.filterwarnings("ignore:.*checkpointing.*:FutureWarning")  # transformers 5 on TRL's config


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def expression(question: str) -> str:
    """"What is 3 + 4 - 2?" -> "3 + 4 - 2" (what Python's eval computes the answer from)."""
    match = re.fullmatch(r"What is (\d+(?: [+-] \d+)+)\?", question)
    assert match, question
    return match.group(1)


def steps_of(question: str) -> int:
    return len(re.findall(r" [+-] ", question))


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# ---- the task -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def math_files(tmp_path_factory):
    return write_math_dataset(tmp_path_factory.mktemp("math"), seed=0, n_sft=3000, n_rl=600)


def test_write_math_dataset_is_reproducible_and_keeps_the_held_out_questions_out(math_files, tmp_path):
    again = write_math_dataset(tmp_path / "again", seed=0, n_sft=3000, n_rl=600)
    other = write_math_dataset(tmp_path / "other", seed=1, n_sft=3000, n_rl=600)
    assert set(again) == set(math_files) == {"math_sft", "grpo", "eval_math"}
    for key, path in math_files.items():
        assert again[key].read_bytes() == path.read_bytes(), key  # the same bytes for the same seed
        assert other[key].read_bytes() != path.read_bytes(), key
    held_out = read_jsonl(math_files["eval_math"])
    questions = [r["question"] for r in held_out]
    n_eval = inspect.signature(write_math_dataset).parameters["n_eval"].default  # (two-step, three-step)
    assert len(set(questions)) == len(questions) == sum(n_eval)
    assert [sum(r["steps"] == s for r in held_out) for s in (2, 3)] == list(n_eval)
    asked = read_jsonl(write_math_dataset(tmp_path / "asked", n_sft=10, n_rl=10, n_eval=(150, 150))["eval_math"])
    assert [sum(r["steps"] == s for r in asked) for s in (2, 3)] == [150, 150]
    sft = [r["conversations"] for r in read_jsonl(math_files["math_sft"])]
    rl = read_jsonl(math_files["grpo"])
    assert len(sft) == 3000 and len(rl) == 600
    assert not set(questions) & {c[0]["content"] for c in sft} and not set(questions) & {r["question"] for r in rl}
    start = lambda q: int(q.split()[2])  # noqa: E731  "What is 9 + 2 - 5?" -> 9
    for r in held_out:
        assert steps_of(r["question"]) == r["steps"] and eval(expression(r["question"])) == r["answer"]
        assert r["steps"] == 3 or start(r["question"]) > 6  # the two-step held-out chains are RL's kind
    for r in rl:  # RL: two-step chains that start at 7..12, a kind the cold start never shows worked
        assert set(r) == {"question", "answer"} and steps_of(r["question"]) == 2 and start(r["question"]) > 6
        assert eval(expression(r["question"])) == r["answer"]
    for user, assistant in sft:
        assert (user["role"], assistant["role"]) == ("user", "assistant") and steps_of(user["content"]) in (1, 2)
        assert steps_of(user["content"]) == 1 or start(user["content"]) <= 6
        answer = eval(expression(user["content"]))
        assert assistant["content"].endswith(f"The answer is {answer}.")
        assert final_number(assistant["content"]) == answer
    assert {steps_of(c[0]["content"]) for c in sft} == {1, 2}


def test_math_dataset_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "zer02llm.grpo", "--out", str(tmp_path / "d")], cwd=tmp_path,
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference = write_math_dataset(tmp_path / "ref")
    for key, name in grpo.MATH_FILES.items():
        assert (tmp_path / "d" / name).read_bytes() == reference[key].read_bytes(), name


def test_chain_problem_answers_equal_pythons_eval():
    rng = random.Random(3)
    for _ in range(400):
        n = rng.randint(1, 5)
        question, reply, answer = chain_problem(rng, n)
        assert steps_of(question) == n and eval(expression(question)) == answer
        lines = reply.split(". ")
        totals = [int(x) for x in re.findall(r"= (\d+)", reply)]
        assert len(totals) == n and totals[-1] == answer and len(lines) == n + 1
        assert all(0 <= t <= 12 + 9 * n for t in totals) and 1 <= int(expression(question).split()[0]) <= 12
        for line in lines[:-1]:  # each worked step is right
            left, right = line.rstrip(".").split(" = ")
            assert eval(left) == int(right)
        assert reply.endswith(f"The answer is {answer}.") and math_reward(reply, answer) == 1.0


@pytest.mark.parametrize("text,number", [
    ("", None), ("no number here.", None), ("The answer is seven.", None),
    ("The answer is -3.", -3), ("It is 12", 12),
    ("3 + 4 = 7. 7 - 2 = 5. The answer is 5.", 5),  # several numbers: the last one
    ("The answer is 5, not 12.", 12), ("007", 7), ("x = -0", 0)])
def test_final_number(text, number):
    assert final_number(text) == number


def test_math_reward():
    assert math_reward("3 + 4 = 7. The answer is 7.", 7) == 1.0
    assert math_reward("The answer is 17.", 7) == 0.0  # a number that contains the answer is not the answer
    assert math_reward("The answer is 7, no, 8.", 7) == 0.0  # the last number counts
    assert math_reward("The answer is -4.", -4) == 1.0 and math_reward("The answer is 4.", -4) == 0.0
    assert math_reward("", 0) == 0.0 and math_reward("I do not know.", 0) == 0.0
    assert isinstance(math_reward("1", 1), float)


# ---- group advantages -----------------------------------------------------------------------------------------
def naive_advantages(rewards: list[list[float]], scale: bool) -> list[list[float]]:
    out = []
    for group in rewards:
        if len(group) == 1:
            out.append(list(group))
            continue
        mean = sum(group) / len(group)
        std = statistics.stdev(group)  # unbiased (n - 1), as TRL's nanstd
        out.append([(r - mean) / (std + 1e-4) if scale else r - mean for r in group])
    return out


REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0],
           [0.25, -1.5, 3.0, 0.5]]


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_against_a_naive_loop(scale):
    got = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), scale=scale)
    torch.testing.assert_close(got, torch.tensor(naive_advantages(REWARDS, scale), dtype=torch.float64),
                               atol=1e-12, rtol=0)
    assert (got[2:4] == 0).all()  # equal rewards: no signal, and no division by zero
    if scale:
        assert got[1].tolist() == pytest.approx([-0.5, -0.5, -0.5, 1.5], abs=1e-3)  # std 0.5 (unbiased), not 0.433


def test_a_group_of_one_is_reinforce():
    rewards = torch.tensor([[0.5], [-2.0], [1.0]])
    for scale in (True, False):
        torch.testing.assert_close(group_advantages(rewards, scale=scale), rewards, atol=0, rtol=0)
    assert group_advantages(rewards) is not rewards


@pytest.mark.parametrize("scale_rewards", ["group", "none"])
def test_group_advantages_equal_trls(scale_rewards):
    """TRL 1.16 computes the advantages inside GRPOTrainer._generate_and_score_completions (no pure function to
    call): trl/trainer/grpo_trainer.py lines 2763-2787 ("sum_then_normalize", one reward function), replicated here
    with TRL's own `nanstd` on rewards flattened in its layout (the G samples of a prompt are consecutive)."""
    nanstd = pytest.importorskip("trl.trainer.utils").nanstd
    g = torch.Generator().manual_seed(0)
    num_generations = 6
    rewards = torch.cat([torch.tensor(REWARDS[:4]).repeat(1, 2)[:, :num_generations].flatten(),
                         torch.randn(3 * num_generations, generator=g)])
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    std_rewards = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    ours = group_advantages(rewards.view(-1, num_generations), scale=scale_rewards != "none").flatten()
    torch.testing.assert_close(ours, advantages, atol=1e-6, rtol=1e-6)


# ---- the token loss -------------------------------------------------------------------------------------------
def loss_inputs(seed=0, n=6, t=7):
    """Random log-probabilities with pi_old far enough from pi that the ratio leaves [0.8, 1.2] on both sides, a
    reference, advantages of both signs, and replies of different lengths (one of a single token)."""
    g = torch.Generator().manual_seed(seed)
    logps = -3 * torch.rand(n, t, generator=g, dtype=torch.float64)
    old = logps + 0.6 * torch.randn(n, t, generator=g, dtype=torch.float64)
    ref = logps + 0.5 * torch.randn(n, t, generator=g, dtype=torch.float64)
    advantages = torch.tensor([1.5, -0.7, 0.0, 2.0, -1.2, 0.4], dtype=torch.float64)[:n]
    lengths = [7, 3, 5, 1, 6, 4][:n]
    mask = torch.tensor([[1] * k + [0] * (t - k) for k in lengths], dtype=torch.float64)
    return logps, old, ref, advantages, mask


def hand_sequence_losses(logps, old, ref, advantages, mask, clip_eps, kl_beta, loss_type, max_new_tokens):
    """DeepSeekMath eq. 4 one token at a time in plain Python floats."""
    out = []
    for i in range(logps.shape[0]):
        total, count = 0.0, 0
        for t in range(logps.shape[1]):
            if not mask[i, t]:
                continue
            ratio = math.exp(logps[i, t].item() - old[i, t].item())
            clipped = min(max(ratio, 1 - clip_eps), 1 + clip_eps)
            a = advantages[i].item()
            token = -min(ratio * a, clipped * a)
            d = ref[i, t].item() - logps[i, t].item()
            total += token + kl_beta * (math.exp(d) - d - 1)
            count += 1
        out.append(total / count if loss_type == "grpo" else total / max_new_tokens)
    return out


def naive_loss(logps, old, ref, advantages, mask, clip_eps, kl_beta, loss_type, max_new_tokens):
    """The same formula, token by token in torch (if/else instead of min and clamp), for autograd."""
    per_reply = []
    for i in range(logps.shape[0]):
        terms = []
        for t in range(logps.shape[1]):
            if not mask[i, t]:
                continue
            ratio = torch.exp(logps[i, t] - old[i, t])
            a = advantages[i]
            if a >= 0 and ratio > 1 + clip_eps:
                surrogate = (1 + clip_eps) * a  # clipped: no gradient
            elif a < 0 and ratio < 1 - clip_eps:
                surrogate = (1 - clip_eps) * a
            else:
                surrogate = ratio * a
            d = ref[i, t] - logps[i, t]
            terms.append(-surrogate + kl_beta * (torch.exp(d) - d - 1))
        total = torch.stack(terms).sum()
        per_reply.append(total / len(terms) if loss_type == "grpo" else total / max_new_tokens)
    return torch.stack(per_reply)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
@pytest.mark.parametrize("kl_beta", [0.0, 0.1])
def test_grpo_token_loss_against_a_hand_computation_and_its_gradient(loss_type, kl_beta):
    logps, old, ref, advantages, mask = loss_inputs()
    ratio = torch.exp(logps - old)[mask.bool()]
    assert (ratio > 1.2).any() and (ratio < 0.8).any()  # clipping acts on both sides
    logps.requires_grad_()
    token = grpo_token_loss(logps, old, ref, advantages, clip_eps=0.2, kl_beta=kl_beta)
    assert token.shape == logps.shape
    losses = reduce_per_sequence(token, mask, loss_type, max_new_tokens=10)
    want = hand_sequence_losses(logps.detach(), old, ref, advantages, mask, 0.2, kl_beta, loss_type, 10)
    assert losses.tolist() == pytest.approx(want, abs=1e-12)
    (ours,) = torch.autograd.grad(losses.sum(), logps)
    (naive,) = torch.autograd.grad(naive_loss(logps, old, ref, advantages, mask, 0.2, kl_beta, loss_type, 10).sum(),
                                   logps)
    torch.testing.assert_close(ours, naive, atol=1e-12, rtol=0)
    assert (ours[mask == 0] == 0).all() and (ours != 0).sum() > 0
    clipped = mask.bool() & (((torch.exp(logps - old) > 1.2) & (advantages[:, None] > 0))
                             | ((torch.exp(logps - old) < 0.8) & (advantages[:, None] < 0)))
    assert clipped.any()
    if not kl_beta:
        assert (ours[clipped] == 0).all()  # a clipped token carries no policy gradient


def test_reduce_per_sequence_length_bias_and_errors():
    token = torch.ones(2, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert reduce_per_sequence(token, mask, "grpo").tolist() == [1.0, 1.0]  # each reply weighs the same
    assert reduce_per_sequence(token, mask, "dr_grpo", max_new_tokens=8).tolist() == [0.5, 0.125]
    with pytest.raises(ValueError, match="loss_type must be 'grpo' or 'dr_grpo', got 'x'"):
        reduce_per_sequence(token, mask, "x")


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory, tok):
    """A factory of TRL GRPOTrainers over a tiny exported model (float32, CPU); their `_compute_loss` is fed given
    per-token log-probabilities by replacing the model call (`_get_per_token_logps_and_entropies`)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl import GRPOConfig, GRPOTrainer

    from zer02llm.hf import export_hf

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("trl")
    path = export_hf(tiny_llm(tok.vocab_size, n_layers=1), root / "policy", tokenizer=tok)

    def make(loss_type, beta, epsilon, max_completion_length):
        args = GRPOConfig(output_dir=str(root / "out"), beta=beta, epsilon=epsilon, loss_type=loss_type,
                          max_completion_length=max_completion_length, num_generations=2,
                          per_device_train_batch_size=2, bf16=False, use_cpu=True, report_to=[],
                          gradient_checkpointing=False, seed=0, use_bias_correction_kl=False)
        trainer = GRPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(path),
                              reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                              train_dataset=datasets.Dataset.from_list([{"prompt": "What is 1 + 2?"}] * 4),
                              processing_class=transformers.AutoTokenizer.from_pretrained(path))
        trainer.model.eval()  # "eval" mode: no division by the gradient accumulation steps
        return trainer

    return make


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
@pytest.mark.parametrize("kl_beta", [0.0, 0.1])
def test_grpo_loss_and_gradient_equal_trls_compute_loss(trl_trainer, loss_type, kl_beta):
    """TRL 1.16's GRPOTrainer._compute_loss (token-level ratio, two-sided clip, k3 KL, "grpo": mean of per-reply
    means, "dr_grpo": sum / (N * max_completion_length)) on the same log-probabilities, with pi_old != pi. TRL 1.16
    multiplies the KL term by the ratio by default (`use_bias_correction_kl=True`, DeepSeek-V3.2), which changes
    the KL gradient even on-policy; the DeepSeekMath loss of chapter 13 is TRL's with that switch off."""
    logps, old, ref, advantages, mask = (x.float() for x in loss_inputs())
    trainer = trl_trainer(loss_type, kl_beta, 0.2, logps.shape[1] + 3)
    logps.requires_grad_()
    trainer._get_per_token_logps_and_entropies = lambda *a, **kw: (logps, torch.zeros_like(logps.detach()), None)
    n, t = logps.shape
    inputs = {"prompt_ids": torch.ones(n, 3, dtype=torch.long), "prompt_mask": torch.ones(n, 3, dtype=torch.long),
              "completion_ids": torch.ones(n, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref}
    theirs = trainer.compute_loss(trainer.model, inputs)
    (their_grad,) = torch.autograd.grad(theirs, logps)
    ours = reduce_per_sequence(grpo_token_loss(logps, old, ref, advantages, 0.2, kl_beta), mask, loss_type,
                               max_new_tokens=t + 3).mean()
    (our_grad,) = torch.autograd.grad(ours, logps)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(our_grad, their_grad, atol=1e-7, rtol=1e-6)
    assert their_grad.abs().sum() > 0
    assert trainer._metrics["eval"]["clip_ratio/region_mean"][-1] > 0  # TRL saw clipping too


# ---- the objective --------------------------------------------------------------------------------------------
QUESTIONS = [{"question": "What is 3 + 4?", "answer": 7}, {"question": "What is 12 - 5 + 5 - 1 + 9?", "answer": 20},
             {"question": "What is 1 + 1 + 1?", "answer": 3}]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, tok):
    ds = GRPODataset(write_lines(tmp_path_factory.mktemp("q") / "q.jsonl", QUESTIONS), tok, 64)
    return ds, ds.collate([ds[i] for i in range(len(ds))])


def ends_early(model: LLM, eos_id: int) -> LLM:
    """A random model almost never samples the end-of-turn token among 1231; a larger (tied) eos row makes it end
    some replies early, so the replies of a batch have different lengths."""
    with torch.no_grad():
        model.lm_head.weight[eos_id] *= 100
    return model


def plain_logprobs(model, prompt: list[int], reply: list[int]) -> torch.Tensor:
    """log pi of each reply token, from one unpadded forward pass of prompt + reply."""
    ids = torch.tensor([prompt + reply])
    logp = model(ids).logits[0].float().log_softmax(-1)
    return logp[len(prompt) - 1:-1].gather(-1, torch.tensor(reply)[:, None])[:, 0]


@pytest.fixture
def recorded(monkeypatch):
    """What GRPOObjective.forward samples and hands to grpo_token_loss."""
    calls = {}

    def sampling(*args, **kw):
        calls["completions"], calls["mask"] = out = real_sample(*args, **kw)
        return out

    def token_loss(logps, old_logps, ref_logps, advantages, clip_eps, kl_beta):
        calls.update(logps=logps, old=old_logps, ref=ref_logps, advantages=advantages)
        return real_loss(logps, old_logps, ref_logps, advantages, clip_eps, kl_beta)

    real_sample, real_loss = grpo.sample_group, grpo.grpo_token_loss
    monkeypatch.setattr(grpo, "sample_group", sampling)
    monkeypatch.setattr(grpo, "grpo_token_loss", token_loss)
    return calls


def test_objective_uses_the_log_probabilities_of_plain_forward_passes(tok, prompts, recorded):
    ds, (ids, answers, mask) = prompts
    assert len(set(map(len, (ds[i][0] for i in range(3))))) == 3  # left padding of different widths
    G, kl_beta = 3, 0.1
    objective = GRPOObjective(ends_early(tiny_llm(tok.vocab_size), tok.eos_id), tok, tiny_llm(tok.vocab_size, seed=1),
                              group_size=G, kl_beta=kl_beta, max_new_tokens=10, temperature=1.5).train()
    torch.manual_seed(0)
    out = objective(ids, labels=answers, attention_mask=mask)
    completions, reply_mask = recorded["completions"], recorded["mask"]
    assert completions.shape == (3 * G, 10)
    lengths = reply_mask.sum(-1).tolist()
    assert len(set(lengths)) > 1 and min(lengths) >= 1
    rewards, per_reply = [], []
    for i in range(3 * G):
        prompt, answer = ds[i // G]
        reply = completions[i, :lengths[i]].tolist()
        assert all(t != tok.eos_id for t in reply[:-1]) and (lengths[i] == 10 or reply[-1] == tok.eos_id)
        with torch.no_grad():
            policy_logp = plain_logprobs(objective.policy, prompt, reply)
            ref_logp = plain_logprobs(objective.reference, prompt, reply)
        torch.testing.assert_close(recorded["logps"][i, :lengths[i]].detach(), policy_logp, atol=ATOL, rtol=0)
        torch.testing.assert_close(recorded["ref"][i, :lengths[i]], ref_logp, atol=ATOL, rtol=0)
        rewards.append(math_reward(tok.decode(reply, skip_special_tokens=True), answer))
        d = ref_logp - policy_logp
        advantage = recorded["advantages"][i].item()
        per_reply.append((-advantage + kl_beta * (torch.exp(d) - d - 1)).mean().item())  # ratio 1: one step/sample
    assert torch.equal(recorded["old"], recorded["logps"].detach()) and not recorded["old"].requires_grad
    torch.testing.assert_close(recorded["advantages"], group_advantages(torch.tensor(rewards).view(3, G)).flatten())
    assert out.lm_loss.item() == pytest.approx(sum(per_reply) / len(per_reply), abs=1e-6)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    torch.manual_seed(0)  # the same samples again
    summed = objective(ids, labels=answers, attention_mask=mask, num_items_in_batch=1).lm_loss
    assert summed.item() == pytest.approx(3 * G * out.lm_loss.item(), rel=1e-6)  # a sum over the replies
    assert objective.training and objective.policy.training and not objective.reference.training


def test_with_groups_of_one_and_no_kl_the_gradient_is_reinforces(tok, prompts, recorded):
    """kl_beta = 0, group_size = 1, "dr_grpo": grad = -(1/N) sum_i r_i grad sum_t log pi(y_i,t) / max_new_tokens,
    on the same samples (torch's generator reset before each)."""
    _, (ids, answers, mask) = prompts
    reward = lambda text, answer: float(len(text) % 4) - 1.5  # varied rewards of both signs
    max_new = 9
    policy = ends_early(tiny_llm(tok.vocab_size), tok.eos_id)
    objective = GRPOObjective(policy, tok, group_size=1, kl_beta=0.0, loss_type="dr_grpo", max_new_tokens=max_new,
                              temperature=1.3, reward=reward).train()
    torch.manual_seed(5)
    objective(ids, labels=answers, attention_mask=mask).lm_loss.backward()
    ours = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    torch.manual_seed(5)
    completions, reply_mask = sample_group(policy, ids, mask, 1, max_new, 1.3, tok.eos_id)
    assert torch.equal(completions, recorded["completions"])
    total, rewards = 0.0, []
    for i, (prompt, _) in enumerate(prompts[0][j] for j in range(3)):
        reply = completions[i, :int(reply_mask[i].sum())].tolist()
        rewards.append(reward(tok.decode(reply, skip_special_tokens=True), None))
        total = total + rewards[-1] * plain_logprobs(policy, prompt, reply).sum()
    (-total / (3 * max_new)).backward()
    assert len(set(rewards)) > 1
    for name, p in policy.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-7, rtol=1e-5, msg=name)
    assert sum(g.abs().sum() for g in ours.values()) > 0


def test_items_and_stats(tok, prompts, recorded):
    _, batch = prompts
    ids, answers, mask = batch
    objective = GRPOObjective(ends_early(tiny_llm(tok.vocab_size), tok.eos_id), tok, tiny_llm(tok.vocab_size, seed=1),
                              group_size=4, kl_beta=0.0, max_new_tokens=8)
    assert objective.items(batch) == 12 and objective.stats() == {}
    reward = lambda text, answer: float(len(text) % 2)
    objective.reward = reward
    want = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        objective(ids, labels=answers, attention_mask=mask)
        lengths = recorded["mask"].sum(-1)
        rewards = torch.tensor([reward(tok.decode(row[:n].tolist(), skip_special_tokens=True), None)
                                for row, n in zip(recorded["completions"], lengths)])
        d = (recorded["ref"] - recorded["logps"].detach())[recorded["mask"].bool()]
        groups = rewards.view(3, 4)
        want.append([rewards.mean().item(), (torch.exp(d) - d - 1).mean().item(), lengths.float().mean().item(),
                     (groups.max(-1).values == groups.min(-1).values).float().mean().item()])
    stats = objective.stats()
    assert list(stats) == ["reward", "kl", "reply_tokens", "no_signal"]
    assert list(stats.values()) == pytest.approx([(a + b) / 2 for a, b in zip(*want)], abs=1e-6)  # since last call
    assert stats["kl"] > 0 and 0 < stats["reply_tokens"] <= 8
    assert objective.stats() == {}


@pytest.mark.parametrize("kw,message", [
    (dict(temperature=0), "temperature must be > 0"), (dict(group_size=0), "group_size must be an integer >= 1"),
    (dict(clip_eps=1), r"clip_eps must be in \(0, 1\), got 1"), (dict(loss_type="x"), "loss_type must be one of"),
    (dict(kl_beta=-0.1), "kl_beta must be"), (dict(max_new_tokens=0), "max_new_tokens must be"),
    (dict(group_size=True), "group_size"), (dict(temperature=float("nan")), "temperature")])
def test_check_grpo_args_errors(tok, kw, message):
    args = {**dict(group_size=4, kl_beta=0.04, clip_eps=0.2, temperature=1.0, max_new_tokens=8), **kw}
    with pytest.raises(ValueError, match=message):
        check_grpo_args(**args)
    with pytest.raises(ValueError, match=message):
        GRPOObjective(tiny_llm(tok.vocab_size, n_layers=1), tok, **args)


def test_check_grpo_args_names_every_problem_and_accepts_good_settings(tok):
    check_grpo_args(1, 0.0, 0.5, 0.1, 1, "dr_grpo")
    with pytest.raises(ValueError) as e:
        check_grpo_args(0, 0.04, 1.0, 0.0, 8)
    assert re.fullmatch(r"group_size must .*, got 0; clip_eps must .*, got 1\.0; temperature must .*, got 0\.0",
                        str(e.value)), str(e.value)
    policy = tiny_llm(tok.vocab_size, n_layers=1)
    with pytest.raises(ValueError, match="another model than the policy"):
        GRPOObjective(policy, tok, policy)
    objective = GRPOObjective(policy, tok)
    assert all(not p.requires_grad for p in objective.reference.parameters())
    assert all(torch.equal(v, objective.reference.state_dict()[k]) for k, v in policy.state_dict().items())


def test_forward_needs_a_grpo_batch_and_room_to_answer(tok, prompts):
    _, (ids, answers, mask) = prompts
    objective = GRPOObjective(tiny_llm(tok.vocab_size, n_layers=1, max_seq_len=ids.shape[1]), tok, group_size=2)
    with pytest.raises(ValueError, match="needs a GRPODataset batch"):
        objective(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="leave no room to answer"):
        objective(ids, labels=answers, attention_mask=mask)


# ---- the dataset ----------------------------------------------------------------------------------------------
def test_dataset_items_and_left_padded_batches(prompts, tok):
    ds, (ids, answers, mask) = prompts
    assert len(ds) == 3 and ds.skipped == 0
    assert answers.tolist() == [7, 20, 3]
    for i, record in enumerate(QUESTIONS):
        prompt, answer = ds[i]
        assert prompt == chat_prompt(tok, record["question"]) and answer == record["answer"]
        n = len(prompt)
        assert ids[i, -n:].tolist() == prompt and (mask[i, -n:] == 1).all()
        assert (mask[i, :-n] == 0).all() and (ids[i, :-n] == tok.pad_id).all()


BAD = [("not json", "invalid JSON"), ({"answer": 3}, "expected an object with a non-empty 'question' string"),
       ({"question": " ", "answer": 3}, "non-empty 'question'"),
       ({"question": "What is 1 + 1?", "answer": "2"}, "'answer' must be a whole number, got '2'"),
       ({"question": "What is 1 + 1?", "answer": True}, "'answer' must be a whole number, got True"),
       ({"question": "What is 1 + 1?", "answer": 2.0}, "'answer' must be a whole number")]


@pytest.mark.parametrize("bad,message", BAD, ids=[m for _, m in BAD])
def test_bad_lines_name_file_and_line(tmp_path, tok, bad, message):
    path = write_lines(tmp_path / "bad.jsonl", [QUESTIONS[0], QUESTIONS[1], bad, QUESTIONS[2]])
    with pytest.raises(JsonlError, match=rf"bad\.jsonl:3: .*{re.escape(message)}"):
        GRPODataset(path, tok, 64)
    ds = GRPODataset(path, tok, 64, skip_bad_lines=True)
    assert len(ds) == 3 and ds.skipped == 1 and ds[2][1] == 3


def test_missing_empty_and_too_long(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="no such file"):
        GRPODataset(tmp_path / "nope.jsonl", tok, 64)
    with pytest.raises(JsonlError, match="empty"):
        GRPODataset(write_lines(tmp_path / "empty.jsonl", []), tok, 64)
    with pytest.raises(ValueError, match="question 2 is .* tokens in the chat template, more than 12"):
        GRPODataset(write_lines(tmp_path / "long.jsonl", QUESTIONS[:2]), tok, 12)


# ---- train.py --mode grpo -------------------------------------------------------------------------------------
ARCH = ["--dim", "32", "--n_layers", "1", "--n_heads", "2", "--n_kv_heads", "1", "--max_seq_len", "64",
        "--device", "cpu"]
GRPO = [*ARCH, "--mode", "grpo", "--batch_size", "2", "--accumulation_steps", "1", "--log_interval", "1",
        "--learning_rate", "3e-3", "--group_size", "4", "--max_new_tokens", "12", "--temperature", "1.0"]
LOG = re.compile(r"step\s+\d+/\d+ \| epoch 1 \| loss -?\d+\.\d{4} \| reward \d\.\d{3} \| kl -?\d+\.\d{4} \| "
                 r"reply \d+\.\d tokens \| no signal \d+% \| lr ")


def cli(*args, cwd, timeout=300):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def log_lines(text: str) -> list[str]:
    """The training log without the throughput (which differs run to run)."""
    return [re.sub(r" \| [\d,]+ tok/s", "", line) for line in text.splitlines() if line.startswith("step ")]


def step_of(line: str) -> int:
    return int(re.match(r"step\s+(\d+)", line).group(1))


@pytest.fixture(scope="module")
def sft_model(math_files, tmp_path_factory):
    """A tiny SFT checkpoint: a random model after a few dozen steps on math_sft (it has the answer format and
    sometimes the right number, so rewards vary), in an out folder of its own."""
    work = tmp_path_factory.mktemp("sft")
    seed_everything(0)
    LLM(LLMconfig(vocab_size=load_tokenizer().vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                  max_seq_len=64)).save_checkpoint(work / "random.pth")
    args = ["--mode", "sft", "--init_from", work / "random.pth", "--data_path", math_files["math_sft"], "--out_dir",
            work / "out", *ARCH, "--batch_size", "16", "--accumulation_steps", "1", "--learning_rate", "1e-2",
            "--max_steps", "40", "--eval_interval", "0", "--log_interval", "20", "--eval_files", "none"]
    assert main([str(a) for a in args]) == 0
    return work / "out" / "sft_32.pth"


def test_grpo_mode_trains_from_the_sft_checkpoint_and_scores_the_held_out_questions(math_files, sft_model, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sft_32.pth").write_bytes(sft_model.read_bytes())
    proc = cli(SCRIPT, *GRPO, "--data_path", math_files["grpo"], "--max_steps", "4", "--eval_interval", "2",
               cwd=tmp_path)  # finds out/sft_32.pth from --dim, eval_math.jsonl beside the data
    out = proc.stdout
    assert "starting from out/sft_32.pth" in out and "600 training questions" in out
    steps = [line for line in log_lines(out) if "epoch" in line]
    assert len(steps) == 4 and all(LOG.match(line) for line in steps), steps
    vals = [line for line in log_lines(out) if "epoch" not in line]
    assert [step_of(v) for v in vals] == [0, 2, 4] and all(re.fullmatch(r"step \d/4 \| eval_math \d+\.\d%", v)
                                                          for v in vals), vals
    assert "saved out/grpo_32.pth" in out
    history = torch.load(tmp_path / "out" / "grpo_32_resume.pth", weights_only=True)["history"]
    logged = [r for r in history if "lm_loss" in r]
    assert all(0 <= r["reward"] <= 1 and 0 < r["reply_tokens"] <= 12 and 0 <= r["no_signal"] <= 1 for r in logged)
    assert logged[0]["kl"] == pytest.approx(0, abs=1e-6) and logged[-1]["kl"] > 0  # the policy leaves the reference
    policy = torch.load(tmp_path / "out" / "grpo_32.pth", weights_only=True)["model"]
    sft = torch.load(sft_model, weights_only=True)["model"]
    assert set(policy) == set(sft) and any(not torch.equal(policy[k], sft[k]) for k in sft)


def test_grpo_kill_and_resume_ends_with_the_same_weights(math_files, sft_model, tmp_path):
    """The samples come from torch's generator: a resumed run must draw exactly what the uninterrupted one drew."""
    small_eval = write_lines(tmp_path / "small_eval.jsonl", read_jsonl(math_files["eval_math"])[::15])
    args = [SCRIPT, *GRPO, "--init_from", sft_model, "--data_path", math_files["grpo"], "--dropout", "0.1",
            "--max_steps", "10", "--save_interval", "3", "--eval_interval", "4", "--eval_files", small_eval]
    for name in ("straight", "killed"):
        (tmp_path / name).mkdir()
    straight = log_lines(cli(*args, cwd=tmp_path / "straight").stdout)
    kill_when(args, tmp_path / "killed", r"step\s+5/10 \| epoch")  # the save after step 3 is on disk
    resumed = cli(*args, "--resume", cwd=tmp_path / "killed").stdout
    saved = int(re.search(r"resumed from out/grpo_32_resume.pth at step (\d+)", resumed).group(1))
    assert saved in (3, 6)
    after = [line for line in log_lines(resumed) if step_of(line) > saved]
    assert after == [line for line in straight if step_of(line) > saved] and len(after) >= 4
    assert any("small_eval" in line for line in after)
    final = lambda name: torch.load(tmp_path / name / "out" / "grpo_32.pth", weights_only=True)["model"]
    a, b = final("straight"), final("killed")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    kls = [float(m) for m in re.findall(r"\| kl (\d+\.\d+)", "\n".join(after))]
    assert len(kls) >= 4 and min(kls) > 0  # the updates after the resume depend on the samples (the KL's gradient)


def error_of(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "step " not in captured.out
    return lines[0].removeprefix("error: ")


@pytest.mark.parametrize("flag,value,message", [("--temperature", "0", "temperature must be > 0"),
                                                ("--group_size", "0", "group_size must be an integer >= 1"),
                                                ("--clip_eps", "1", "clip_eps must be in (0, 1)"),
                                                ("--max_new_tokens", "0", "max_new_tokens must be")])
def test_bad_grpo_flags_stop_before_any_work(math_files, sft_model, tmp_path, capsys, flag, value, message):
    out = tmp_path / "out"
    argv = [*GRPO, "--init_from", sft_model, "--data_path", math_files["grpo"], "--out_dir", out, "--max_steps", "2",
            flag, value]
    assert message in error_of(argv, capsys)
    assert not out.exists(), "refused before anything was written"


def test_the_script_refuses_a_bad_grpo_flag_with_one_line(math_files, sft_model, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), *GRPO, "--init_from", str(sft_model), "--data_path",
                           str(math_files["grpo"]), "--group_size", "0"], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: group_size must"), proc.stderr
    assert "step " not in proc.stdout and not (tmp_path / "out").exists()


def test_bad_grpo_lines_name_file_and_line_and_can_be_skipped(sft_model, tmp_path, capsys):
    data = write_lines(tmp_path / "mixed.jsonl", QUESTIONS[:2] + [{"question": "What is 1 + 1?", "answer": "2"}]
                       + QUESTIONS * 2)
    argv = [*GRPO, "--init_from", sft_model, "--data_path", data, "--out_dir", tmp_path / "out", "--max_steps", "1",
            "--eval_files", "none"]
    message = error_of(argv, capsys)
    assert message.startswith(f"{data}:3:") and "--skip_bad_lines" in message, message
    assert main([str(a) for a in argv + ["--skip_bad_lines"]]) == 0
    assert f"--skip_bad_lines: skipped 1 malformed line(s) of {data}" in capsys.readouterr().out


SPY = """
import json, os, sys
import zer02llm.grpo as grpo
from zer02llm.train import main

forward, stats = grpo.GRPOObjective.forward, grpo.GRPOObjective.stats


def spied_forward(self, input_ids, labels=None, attention_mask=None, **kw):
    with open(f"rank{os.environ['RANK']}.jsonl", "a") as f:
        f.write(json.dumps({"prompts": input_ids.tolist(), "answers": labels.tolist()}) + "\\n")
    return forward(self, input_ids, labels=labels, attention_mask=attention_mask, **kw)


def spied_stats(self):
    values = stats(self)
    with open(f"stats{os.environ['RANK']}.jsonl", "a") as f:
        f.write(json.dumps(values) + "\\n")
    return values


grpo.GRPOObjective.forward, grpo.GRPOObjective.stats = spied_forward, spied_stats
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_grpo_under_torchrun_two_processes(math_files, sft_model, tmp_path):
    """Each rank samples replies to its own prompts; the logged reward and reply length are the means of both."""
    spy = tmp_path / "spy.py"
    spy.write_text(SPY, encoding="utf-8")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**ENV, "PET_MASTER_PORT": str(free_port())}
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", str(spy), "--ddp", *GRPO, "--init_from",
                           str(sft_model), "--data_path", str(math_files["grpo"]), "--max_steps", "3",
                           "--eval_files", "none"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout and proc.stdout.count("saved out/grpo_32.pth") == 1
    state = torch.load(tmp_path / "out" / "grpo_32_resume.pth", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 3
    seen = [read_jsonl(tmp_path / f"rank{r}.jsonl") for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 3
    for mine, theirs in zip(*seen):
        assert mine["prompts"] != theirs["prompts"] and len(mine["answers"]) == 2
    per_rank = [read_jsonl(tmp_path / f"stats{r}.jsonl") for r in (0, 1)]
    logged = [r for r in state["history"] if "lm_loss" in r]
    assert len(logged) == 3
    for record, a, b in zip(logged, *per_rank):
        for key in ("reward", "kl", "reply_tokens", "no_signal"):
            assert record[key] == pytest.approx((a[key] + b[key]) / 2, abs=1e-6), key
    assert any(a["reply_tokens"] != b["reply_tokens"] for a, b in zip(*per_rank))
