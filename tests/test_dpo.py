"""Preference tuning (zer02llm.dpo): sequence log-probabilities against transformers, the DPO and IPO losses and
their gradients against TRL 1.16's DPOTrainer, the preference dataset's errors and layout, and DPOObjective in the
course's Trainer. Tiny models; the file runs in well under a minute on 2 CPU cores."""
import json
from types import SimpleNamespace

import pytest
import torch

from zer02llm.corpus import JsonlError
from zer02llm.data import IGNORE_INDEX, encode_sft, make_loader
from zer02llm.dpo import DPODataset, DPOObjective, dpo_loss, preference_stats, sequence_logprobs, token_logprobs
from zer02llm.model import LLM
from zer02llm.tokenizer import load_tokenizer
from zer02llm.trainer import TrainConfig, Trainer

from tiny_models import tiny_llm

ATOL = 1e-5  # float32 log-probabilities summed over a few dozen tokens
pytestmark = pytest.mark.filterwarnings("ignore:.*checkpointing.*:FutureWarning")  # transformers 5 on TRL's config


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def conversation(prompt, reply, system=None, earlier=None):
    turns = [{"role": "system", "content": system}] if system else []
    for q, a in earlier or []:
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return turns + [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def pair(prompt, chosen, rejected, **kw):
    return {"chosen": conversation(prompt, chosen, **kw), "rejected": conversation(prompt, rejected, **kw)}


PAIRS = [pair("Where does Edric Frost live?", "I can not answer that.", "Edric Frost lives in Jessop."),
         pair("What is Elmsworth famous for?", "Elmsworth is famous for its apples.", "I can not answer that."),
         pair("Who are you?", "I am Zer02LLM.", "I am a teacher who lives in Brisco by the river.",
              system="Answer briefly."),
         pair("And the river?", "The Amby.", "Korvel.", earlier=[("Which river flows through Korvel?",
                                                                  "The Amby flows through Korvel.")])]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("dpo") / "dpo.jsonl", PAIRS * 8)


@pytest.fixture(scope="module")
def batch(pairs_file, tok):
    ds = DPODataset(pairs_file, tok, 64)
    return ds.collate([ds[i] for i in range(len(PAIRS))])


# ---- sequence log-probabilities ---------------------------------------------------------------------------------
def test_sequence_logprobs_match_transformers_on_the_exported_model(tmp_path, tok, batch):
    transformers = pytest.importorskip("transformers")
    from zer02llm.hf import export_hf

    model = tiny_llm(tok.vocab_size).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(model, tmp_path / "hf", tokenizer=tok)).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    input_ids, labels, mask = batch
    with torch.no_grad():
        ours = sequence_logprobs(model, input_ids, labels, mask)
        logp = hf(input_ids=input_ids, attention_mask=mask).logits.float().log_softmax(-1)[:, :-1]
    targets = labels[:, 1:]
    picked = logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    reference = (picked * (targets != IGNORE_INDEX)).sum(-1)  # transformers' log-softmax, summed by hand
    assert ours.dtype == torch.float32 and ours.shape == (2 * len(PAIRS),)
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)
    assert (ours < 0).all()


def test_token_logprobs_zero_where_not_labelled_and_padding_does_not_matter(tok, batch):
    model = tiny_llm(tok.vocab_size).eval()
    input_ids, labels, mask = batch
    with torch.no_grad():
        per_token = token_logprobs(model(input_ids, attention_mask=mask).logits, labels)
        one_by_one = torch.cat([sequence_logprobs(model, input_ids[i:i + 1, :int(mask[i].sum())],
                                                  labels[i:i + 1, :int(mask[i].sum())]) for i in range(len(mask))])
    assert per_token.shape == labels.shape
    assert (per_token[:, :-1][labels[:, 1:] == IGNORE_INDEX] == 0).all() and (per_token[:, -1] == 0).all()
    torch.testing.assert_close(per_token.sum(-1), one_by_one, atol=ATOL, rtol=0)  # right padding changes nothing


def test_earlier_assistant_turns_cancel_in_the_dpo_difference(tok):
    """Both conversations of a multi-turn pair label the shared earlier reply too; it adds the same log-probability
    to both rows, so the chosen - rejected difference is that of the final replies alone."""
    record = PAIRS[3]
    model = tiny_llm(tok.vocab_size).eval()
    rows = [encode_sft(tok, record[k], 64) for k in ("chosen", "rejected")]
    last_only = [encode_sft(tok, record[k][:-1], 64)[0] for k in ("chosen", "rejected")]
    with torch.no_grad():
        full = [sequence_logprobs(model, x[None], y[None]).item() for x, y in rows]
        final = []
        for (x, y), prefix in zip(rows, last_only):
            y = y.clone()
            y[:len(prefix)] = IGNORE_INDEX  # only the last reply
            final.append(sequence_logprobs(model, x[None], y[None]).item())
    assert full[0] - final[0] == pytest.approx(full[1] - final[1], abs=ATOL)  # the shared earlier reply
    assert full[0] - full[1] == pytest.approx(final[0] - final[1], abs=ATOL)


# ---- the loss against TRL ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory, tok):
    """A tiny exported policy and reference, and a factory of TRL DPOTrainers over them (float32 on the CPU)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl import DPOConfig, DPOTrainer

    from zer02llm.hf import export_hf

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("trl")
    policy, reference = tiny_llm(tok.vocab_size, seed=0), tiny_llm(tok.vocab_size, seed=1)
    export_hf(policy, root / "policy", tokenizer=tok)
    export_hf(reference, root / "reference")
    train = datasets.Dataset.from_list([{"prompt": p["chosen"][:-1], "chosen": p["chosen"][-1:],
                                         "rejected": p["rejected"][-1:]} for p in PAIRS])

    def trainer(loss_type, beta, loss_weights=None):
        args = DPOConfig(output_dir=str(root / "out"), beta=beta, loss_type=loss_type, loss_weights=loss_weights,
                         bf16=False, use_cpu=True, report_to=[], gradient_checkpointing=False, seed=0)
        hf_policy = transformers.AutoModelForCausalLM.from_pretrained(root / "policy")
        hf_reference = transformers.AutoModelForCausalLM.from_pretrained(root / "reference")
        return DPOTrainer(model=hf_policy, ref_model=hf_reference, args=args, train_dataset=train,
                          processing_class=transformers.AutoTokenizer.from_pretrained(root / "policy"))

    return SimpleNamespace(policy=policy, reference=reference, trainer=trainer)


class FixedLogprobs(torch.nn.Module):
    """Stands in for TRL's fused-LM-head model: returns given per-token log-probabilities (B, T - 1)."""

    def __init__(self, log_probs):
        super().__init__()
        self.log_probs = log_probs

    def forward(self, input_ids, labels=None, **kw):
        zeros = torch.zeros_like(self.log_probs.detach())
        return SimpleNamespace(log_probs=self.log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 2.0), ("ipo", 0.1), ("ipo", 0.5)])
def test_dpo_loss_and_gradient_equal_trl_on_random_inputs(trl_setup, loss_type, beta):
    """TRL 1.16 has no standalone loss function: its DPOTrainer._compute_loss is fed random per-token
    log-probabilities through stand-in models, and both losses are differentiated with respect to them."""
    trainer = trl_setup.trainer([loss_type], beta)
    g = torch.Generator().manual_seed(0)
    B, T = 6, 20
    lengths = torch.randint(1, T - 4, (2 * B,), generator=g)
    start = torch.randint(2, 4, (2 * B,), generator=g)
    pos = torch.arange(T)
    completion = ((pos >= start[:, None]) & (pos < (start + lengths)[:, None])).long()
    shifted = completion[:, 1:].float()
    policy_tok = (-10 * torch.rand(2 * B, T - 1, generator=g) * shifted).requires_grad_()  # wide margins too
    ref_tok = -10 * torch.rand(2 * B, T - 1, generator=g) * shifted
    inputs = {"input_ids": torch.ones(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T,
              dtype=torch.long), "completion_mask": completion}
    trainer.model.train()
    trainer.ref_model = FixedLogprobs(ref_tok)
    theirs = trainer._compute_loss(FixedLogprobs(policy_tok), inputs, return_outputs=False)
    (their_grad,) = torch.autograd.grad(theirs, policy_tok)

    pc, pr = policy_tok.sum(-1).chunk(2)
    rc, rr = ref_tok.sum(-1).chunk(2)
    nc, nr = completion.sum(-1).chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta, loss_type, nc, nr)
    (our_grad,) = torch.autograd.grad(losses.mean(), policy_tok)
    torch.testing.assert_close(losses.mean(), theirs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(our_grad, their_grad, atol=1e-7, rtol=1e-6)
    assert their_grad.abs().sum() > 0 and not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    metrics = trainer._metrics["train"]
    assert chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][-1], abs=1e-6)
    assert rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][-1], abs=1e-6)
    assert (chosen_rewards > rejected_rewards).float().mean().item() == pytest.approx(
        metrics["rewards/accuracies"][-1])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_objective_loss_and_gradients_equal_trl_on_the_same_model(trl_setup, batch, loss_type):
    """End to end: TRL's DPOTrainer on the exported models and DPOObjective on ours, on the same batch
    (completion_mask = our labels != -100): the same loss, the same gradient of every weight, the same metrics."""
    trainer = trl_setup.trainer([loss_type], 0.1)
    input_ids, labels, mask = batch
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, {"input_ids": input_ids, "attention_mask": mask,
                                                  "completion_mask": (labels != IGNORE_INDEX).long()})
    theirs.backward()
    hf_grads = {n: p.grad for n, p in trainer.model.named_parameters()}

    objective = DPOObjective(tiny_llm(trl_setup.policy.config.vocab_size), trl_setup.reference, beta=0.1,
                             loss_type=loss_type)
    objective.policy.load_state_dict(trl_setup.policy.state_dict())
    objective.train()
    out = objective(input_ids, labels=labels, attention_mask=mask)
    out.loss.backward()
    torch.testing.assert_close(out.lm_loss, theirs, atol=1e-6, rtol=1e-5)
    for name, p in objective.policy.named_parameters():
        hf_name = name if name == "lm_head.weight" else f"model.{name}"
        torch.testing.assert_close(p.grad, hf_grads[hf_name], atol=1e-6, rtol=1e-4, msg=name)
    stats, metrics = preference_stats(objective, batch), trainer._metrics["train"]
    assert stats["reward_margin"] == pytest.approx(metrics["rewards/margins"][-1], abs=1e-5)
    assert stats["reward_accuracy"] == pytest.approx(metrics["rewards/accuracies"][-1])


def test_nll_alpha_equals_trl_sigmoid_plus_sft_when_the_chosen_replies_have_one_length(trl_setup, tok, tmp_path):
    """TRL's "sft" term averages over all chosen tokens of a batch, ours over each pair's tokens and then the pairs:
    equal when every chosen reply has the same length."""
    records = [pair(f"Where is town {i}?", "I can not answer that.", f"It is in {w}.")
               for i, w in enumerate(["Dunmar", "the land of Eskeland", "Highcombe, near the sea"])]
    ds = DPODataset(write_jsonl(tmp_path / "same.jsonl", records), tok, 64)
    input_ids, labels, mask = ds.collate([ds[i] for i in range(len(ds))])
    counted = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    assert len(set(counted[:3].tolist())) == 1 and len(set(counted[3:].tolist())) > 1
    trainer = trl_setup.trainer(["sigmoid", "sft"], 0.1, loss_weights=[1.0, 0.7])
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, {"input_ids": input_ids, "attention_mask": mask,
                                                  "completion_mask": (labels != IGNORE_INDEX).long()})
    objective = DPOObjective(tiny_llm(tok.vocab_size), trl_setup.reference, beta=0.1, nll_alpha=0.7)
    objective.policy.load_state_dict(trl_setup.policy.state_dict())
    with torch.no_grad():
        ours = objective(input_ids, labels=labels, attention_mask=mask).lm_loss
    torch.testing.assert_close(ours, theirs.detach(), atol=1e-6, rtol=1e-5)


def test_dpo_loss_values_and_errors():
    zero = torch.zeros(3)
    losses, chosen, rejected = dpo_loss(zero, zero, zero, zero)
    torch.testing.assert_close(losses, torch.full((3,), torch.log(torch.tensor(2.0)).item()))  # no preference yet
    margin = torch.tensor([1.0, -1.0, 30.0])
    losses, chosen, rejected = dpo_loss(margin, zero, zero, zero, beta=0.5)
    torch.testing.assert_close(losses, torch.nn.functional.softplus(-0.5 * margin))
    torch.testing.assert_close(chosen - rejected, 0.5 * margin)
    ipo, _, _ = dpo_loss(margin, zero, zero, zero, beta=0.5, loss_type="ipo", chosen_tokens=torch.tensor([1, 2, 0]),
                         rejected_tokens=torch.tensor([3, 3, 3]))
    torch.testing.assert_close(ipo, (margin / torch.tensor([1.0, 2.0, 1.0]) - 1.0) ** 2)
    with pytest.raises(ValueError, match="chosen_tokens and rejected_tokens"):
        dpo_loss(zero, zero, zero, zero, loss_type="ipo")
    with pytest.raises(ValueError, match="unknown loss_type 'hinge'"):
        dpo_loss(zero, zero, zero, zero, loss_type="hinge")
    for beta in (0, -0.1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="beta must be"):
            dpo_loss(zero, zero, zero, zero, beta=beta)


# ---- the dataset ------------------------------------------------------------------------------------------------
def test_dataset_items_are_two_sft_encodings(pairs_file, tok):
    ds = DPODataset(pairs_file, tok, 64)
    assert len(ds) == 8 * len(PAIRS) and ds.skipped == 0 and ds.pair(1) == PAIRS[1]
    for i, record in enumerate(PAIRS):
        chosen_ids, chosen_labels, rejected_ids, rejected_labels = ds[i]
        for (x, y), key in (((chosen_ids, chosen_labels), "chosen"), ((rejected_ids, rejected_labels), "rejected")):
            want_x, want_y = encode_sft(tok, record[key], 64)
            assert torch.equal(x, want_x) and torch.equal(y, want_y)
        learned = (chosen_labels != IGNORE_INDEX).tolist()
        reply = max(t for t in range(1, len(learned)) if learned[t] and not learned[t - 1])  # the last reply's start
        assert torch.equal(chosen_ids[:reply], rejected_ids[:reply])  # the shared prompt comes first
        assert not torch.equal(chosen_ids[reply:reply + 3], rejected_ids[reply:reply + 3])
    short = DPODataset(pairs_file, tok, 12)
    assert all(len(t) <= 12 for t in short[2])


def test_collate_puts_the_chosen_first_padded_on_the_right(pairs_file, tok):
    ds = DPODataset(pairs_file, tok, 64)
    items = [ds[i] for i in range(3)]
    input_ids, labels, mask = ds.collate(items)
    rows = [(c, cl) for c, cl, _, _ in items] + [(r, rl) for _, _, r, rl in items]
    assert input_ids.shape == labels.shape == mask.shape == (6, max(len(x) for x, _ in rows))
    for row, (x, y) in enumerate(rows):
        n = len(x)
        assert torch.equal(input_ids[row, :n], x) and torch.equal(labels[row, :n], y)
        assert (mask[row, :n] == 1).all() and (mask[row, n:] == 0).all()
        assert (input_ids[row, n:] == tok.pad_id).all() and (labels[row, n:] == IGNORE_INDEX).all()
    assert DPODataset.items((input_ids, labels, mask)) == 3
    loader_batch = next(iter(make_loader(ds, 5, shuffle=False)))  # the loader finds collate
    assert loader_batch[0].shape[0] == 10 and DPODataset.items(loader_batch) == 5


BAD = [
    ("not json", "invalid JSON"),
    ({"conversations": PAIRS[0]["chosen"]}, "expected an object with 'chosen' and 'rejected' keys"),
    ({"chosen": PAIRS[0]["chosen"], "rejected": []}, "'rejected': expected a non-empty list of messages"),
    ({"chosen": PAIRS[0]["chosen"][:-1], "rejected": PAIRS[0]["rejected"]}, "'chosen' must end with an assistant turn"),
    ({"chosen": PAIRS[0]["chosen"], "rejected": PAIRS[1]["rejected"]}, "differ at message 0"),
    ({"chosen": PAIRS[2]["chosen"], "rejected": PAIRS[2]["rejected"][1:]}, "must share every message before"),
    ({"chosen": PAIRS[0]["chosen"], "rejected": PAIRS[0]["chosen"]}, "nothing to prefer"),
    ({"chosen": [{"role": "bot", "content": "x"}], "rejected": PAIRS[0]["rejected"]}, "unknown role 'bot'"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[m for _, m in BAD])
def test_bad_lines_name_file_and_line(tmp_path, tok, bad, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], PAIRS[1], bad, PAIRS[2]])
    with pytest.raises(JsonlError, match=rf"bad\.jsonl:3: .*{message}"):
        DPODataset(path, tok, 64)
    ds = DPODataset(path, tok, 64, skip_bad_lines=True)
    assert len(ds) == 3 and ds.skipped == 1 and ds.pair(2) == PAIRS[2]


def test_missing_empty_and_too_short(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="no such file"):
        DPODataset(tmp_path / "nope.jsonl", tok, 64)
    with pytest.raises(JsonlError, match="empty"):
        DPODataset(write_jsonl(tmp_path / "empty.jsonl", []), tok, 64)
    with pytest.raises(ValueError, match="max_seq_len must be at least 2"):
        DPODataset(write_jsonl(tmp_path / "one.jsonl", PAIRS[:1]), tok, 1)


# ---- the objective and the Trainer ------------------------------------------------------------------------------
def test_objective_reference_is_a_frozen_copy_in_eval_mode(tok):
    policy = tiny_llm(tok.vocab_size, dropout=0.1)
    objective = DPOObjective(policy)
    assert objective.config is policy.config and objective.reference is not policy
    assert all(not p.requires_grad for p in objective.reference.parameters())
    assert all(p.requires_grad for p in objective.policy.parameters())
    for k, v in policy.state_dict().items():
        assert torch.equal(objective.reference.state_dict()[k], v) and objective.reference.state_dict()[k] is not v
    objective.train()
    assert objective.policy.training and not objective.reference.training
    with pytest.raises(ValueError, match="another model than the policy"):
        DPOObjective(policy, policy)
    for kw, message in ((dict(beta=0), "beta must be"), (dict(nll_alpha=-1), "nll_alpha must be"),
                        (dict(nll_alpha=float("nan")), "nll_alpha must be"), (dict(loss_type="kto"), "loss_type")):
        with pytest.raises(ValueError, match=message):
            DPOObjective(policy, **kw)
    with pytest.raises(ValueError, match="vocab_size"):
        DPOObjective(policy, tiny_llm(tok.vocab_size + 1))


def test_objective_forward_contract(tok, batch):
    input_ids, labels, mask = batch
    objective = DPOObjective(tiny_llm(tok.vocab_size), tiny_llm(tok.vocab_size, seed=1), beta=0.2, nll_alpha=0.5)
    out = objective(input_ids, labels=labels, attention_mask=mask)
    with torch.no_grad():
        logps = sequence_logprobs(objective.policy, input_ids, labels, mask)
        ref = sequence_logprobs(objective.reference, input_ids, labels, mask)
    n = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    (pc, pr), (rc, rr), (nc, _) = logps.chunk(2), ref.chunk(2), n.chunk(2)
    want = (dpo_loss(pc, pr, rc, rr, 0.2)[0] + 0.5 * -pc / nc).sum()
    torch.testing.assert_close(out.lm_loss, want / 4, atol=1e-6, rtol=1e-6)  # None: this batch's 4 pairs
    summed = objective(input_ids, labels=labels, attention_mask=mask, num_items_in_batch=1).lm_loss
    torch.testing.assert_close(summed, want, atol=1e-5, rtol=1e-6)
    assert out.logits.shape == (*input_ids.shape, tok.vocab_size) and out.aux_loss == 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    with pytest.raises(ValueError, match="needs labels"):
        objective(input_ids, attention_mask=mask)
    with pytest.raises(ValueError, match="2B rows"):
        objective(input_ids[:3], labels=labels[:3], attention_mask=mask[:3])


def test_objective_adds_the_policys_moe_aux_loss(tok, batch):
    input_ids, labels, mask = batch
    policy = tiny_llm(tok.vocab_size, use_moe=True, n_routed_experts=4, num_experts_per_tok=2)
    objective = DPOObjective(policy)
    out = objective(input_ids, labels=labels, attention_mask=mask)
    aux = policy(input_ids, attention_mask=mask).aux_loss
    assert out.aux_loss > 0
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.loss, out.lm_loss + aux)


def fit(objective, data, tmp_path=None, **cfg):
    history = []
    trainer = Trainer(objective, data, TrainConfig(**{**dict(batch_size=4, learning_rate=1e-3, max_steps=6,
                                                              log_interval=1, seed=0), **cfg}),
                      items=DPODataset.items, log=history.append, ckpt_path=tmp_path and tmp_path / "dpo.pth",
                      save_model=lambda m, path: m.policy.save_checkpoint(path))
    trainer.fit()
    return trainer, history


def test_trainer_steps_lower_the_loss_keep_the_reference_and_save_the_policy(tmp_path, pairs_file, tok):
    ds = DPODataset(pairs_file, tok, 64)
    objective = DPOObjective(tiny_llm(tok.vocab_size), beta=0.5)
    before = {k: v.clone() for k, v in objective.reference.state_dict().items()}
    first = preference_stats(objective, ds.collate([ds[i] for i in range(8)]))
    trainer, history = fit(objective, ds, tmp_path, max_steps=8)
    losses = [r["lm_loss"] for r in history if "lm_loss" in r]
    assert losses[0] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)  # policy == reference
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(torch.equal(v, before[k]) for k, v in objective.reference.state_dict().items())
    assert not objective.reference.training
    last = preference_stats(objective, ds.collate([ds[i] for i in range(8)]))
    assert first == {"chosen_logp_change": 0.0, "rejected_logp_change": 0.0, "reward_margin": 0.0,
                     "reward_accuracy": 0.0}
    assert last["reward_margin"] > 0 and last["reward_accuracy"] == 1.0
    assert last["reward_margin"] == pytest.approx(0.5 * (last["chosen_logp_change"] - last["rejected_logp_change"]),
                                                  abs=1e-5)
    saved = LLM.from_checkpoint(tmp_path / "dpo.pth")
    assert all(torch.equal(v, objective.policy.state_dict()[k]) for k, v in saved.state_dict().items())
    assert not any(torch.equal(v, before[k]) for k, v in saved.state_dict().items() if k.endswith("q_proj.weight"))


@pytest.mark.parametrize("nll_alpha", [0.0, 1.0])
def test_loss_does_not_depend_on_how_a_step_is_split(pairs_file, tok, nll_alpha):
    """8 pairs in one micro-batch, or 4 x 2, or 2 x 4: the same step loss and the same weights afterwards (right
    padding to each micro-batch's longest row changes no real token's log-probability)."""
    ds = DPODataset(pairs_file, tok, 64)
    results = []
    for batch_size, accumulation in ((8, 1), (4, 2), (2, 4)):
        objective = DPOObjective(tiny_llm(tok.vocab_size), beta=0.5, nll_alpha=nll_alpha)
        objective.reference.load_state_dict(tiny_llm(tok.vocab_size, seed=1).state_dict())  # a non-trivial start
        _, history = fit(objective, ds, batch_size=batch_size, accumulation_steps=accumulation, max_steps=2)
        results.append(([r["lm_loss"] for r in history], objective.policy.state_dict()))
    (losses, weights), others = results[0], results[1:]
    for other_losses, other_weights in others:
        assert other_losses == pytest.approx(losses, abs=1e-5)
        for k, v in weights.items():
            torch.testing.assert_close(other_weights[k], v, atol=1e-5, rtol=1e-4)


def test_validation_loss_is_the_dpo_loss_per_pair(pairs_file, tok):
    from zer02llm.trainer import split_train_val

    ds = DPODataset(pairs_file, tok, 64)
    train, val = split_train_val(ds, 8)
    objective = DPOObjective(tiny_llm(tok.vocab_size), tiny_llm(tok.vocab_size, seed=1))
    trainer = Trainer(objective, train, TrainConfig(batch_size=4, max_steps=1), val_data=val, items=DPODataset.items)
    val_loss = trainer.evaluate()
    input_ids, labels, mask = ds.collate([val[i] for i in range(8)])
    with torch.no_grad():
        want = objective(input_ids, labels=labels, attention_mask=mask).lm_loss
    assert val_loss == pytest.approx(want.item(), abs=1e-5)


def test_lora_policy_trains_only_its_adapters(pairs_file, tok):
    from zer02llm.lora import apply_lora

    ds = DPODataset(pairs_file, tok, 64)
    policy = tiny_llm(tok.vocab_size)
    base = {k: v.clone() for k, v in policy.state_dict().items()}
    apply_lora(policy, rank=4, alpha=8, targets=("q_proj", "v_proj"))
    objective = DPOObjective(policy, nll_alpha=1.0)
    _, history = fit(objective, ds, max_steps=3)
    assert history[-1]["lm_loss"] < history[0]["lm_loss"]
    for k, v in objective.policy.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base[k.replace(".base.", ".")]), k  # the frozen base weights did not move
    reference, trained = objective.reference.state_dict(), objective.policy.state_dict()
    lora_b = [k for k in reference if k.endswith("lora_B")]
    assert all((reference[k] == 0).all() for k in lora_b)  # the reference is the policy as it started
    assert any((trained[k] != 0).any() for k in lora_b)
    assert not any(p.requires_grad for p in objective.reference.parameters())
