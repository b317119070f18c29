"""The training loop (zer02llm.trainer): schedule, parameter groups, AMP helpers, data order, accumulation,
checkpoints, exact resume, and the errors a broken run must give. Tiny models; the whole file runs in seconds."""
import gc
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset, Subset

from zer02llm.config import LLMconfig
from zer02llm.data import IGNORE_INDEX, SFTDataset
from zer02llm.model import LLM
from zer02llm.trainer import (TrainConfig, Trainer, autocast_context, checkpoint_path, configure_optimizer,
                              default_dtype, get_lr, make_grad_scaler, param_groups, resume_path, split_train_val)
from zer02llm.utils import seed_everything

VOCAB = 64


class RandomBlocks(Dataset):
    """(input_ids, labels) blocks of random tokens with some structure (every token repeats), so losses fall."""

    def __init__(self, n: int = 96, seq_len: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        half = torch.randint(0, VOCAB, (n, seq_len // 2), generator=g)
        self.x = half.repeat_interleave(2, dim=1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.x[i].clone()


def tiny_model(seed: int = 0, **kw) -> LLM:
    seed_everything(seed)
    return LLM(LLMconfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16, **kw))


# ---- schedule -----------------------------------------------------------------------------------------------
def test_lr_schedule_warmup_cosine_floor():
    S, lr, w = 100, 1e-3, 10
    assert get_lr(0, S, lr, w) == pytest.approx(lr / w)
    assert get_lr(w - 1, S, lr, w) == pytest.approx(lr)  # warmup ends at the peak
    assert get_lr(w, S, lr, w) == pytest.approx(lr)
    mid = w + (S - w) // 2
    assert get_lr(mid, S, lr, w) == pytest.approx(0.1 * lr + 0.5 * 0.9 * lr * (1 + math.cos(math.pi * 0.5)))
    assert get_lr(S, S, lr, w) == pytest.approx(0.1 * lr)
    assert get_lr(10 * S, S, lr, w) == pytest.approx(0.1 * lr)
    assert get_lr(0, S, lr, 0) == pytest.approx(lr)  # no warmup: start at the peak
    values = [get_lr(s, S, lr, w) for s in range(w, S)]
    assert all(a >= b for a, b in zip(values, values[1:])), "the cosine part must not increase"


# ---- optimizer ----------------------------------------------------------------------------------------------
def test_param_groups_decay_matrices_only():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    assert any(names[id(p)] == "embed_tokens.weight" for p in decay["params"])  # embeddings are decayed
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_parameters()  # the tied embedding / LM head counted once


def test_param_groups_skip_frozen_and_reject_all_frozen():
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    model.norm.weight.requires_grad_(True)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["params"] == [] and no_decay["params"] == [model.norm.weight]
    model.norm.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        configure_optimizer(model, 1e-3)


# ---- mixed precision ----------------------------------------------------------------------------------------
def test_autocast_and_scaler_choices():
    lin = torch.nn.Linear(4, 4)
    with autocast_context("cpu", "float32"):
        assert lin(torch.randn(2, 4)).dtype == torch.float32
    with autocast_context("cpu", "bfloat16"):
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    assert lin.weight.dtype == torch.float32
    assert [d for d in ("float32", "bfloat16", "float16") if make_grad_scaler(d, "cpu").is_enabled()] == ["float16"]
    assert default_dtype("cpu") == "float32"
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        autocast_context("cpu", "float8")


# ---- names and data order -----------------------------------------------------------------------------------
def test_checkpoint_names():
    assert checkpoint_path("out", "pretrain", 512) == Path("out/pretrain_512.pth")
    assert checkpoint_path("out", "sft", 768, use_moe=True) == Path("out/sft_768_moe.pth")
    assert resume_path(Path("out/sft_768_moe.pth")) == Path("out/sft_768_moe_resume.pth")


def test_split_train_val():
    train, val = split_train_val(RandomBlocks(10), 3)
    assert list(train.indices) == list(range(7)) and list(val.indices) == [7, 8, 9]
    with pytest.raises(ValueError, match="cannot hold out"):
        split_train_val(RandomBlocks(10), 10)


def test_train_config_validation():
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown dtype"):
        TrainConfig(dtype="fp8")
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(learning_rate=0)
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)
    for name in ("learning_rate", "grad_clip", "weight_decay"):
        for bad in (math.nan, math.inf):
            with pytest.raises(ValueError, match=name):
                TrainConfig(**{name: bad})


# ---- the loop -----------------------------------------------------------------------------------------------
def test_accumulation_equals_one_big_batch():
    """2 micro-batches of 4 (loss / 2 each) must give the gradient, loss and update of one batch of 8."""
    data = RandomBlocks(64)
    runs = []
    for batch, accum in ((8, 1), (4, 2)):
        model = tiny_model()
        history = Trainer(model, data, TrainConfig(batch_size=batch, accumulation_steps=accum, max_steps=1,
                                                   learning_rate=1e-2, log_interval=1)).fit()
        runs.append((history[-1], torch.cat([p.detach().flatten() for p in model.parameters()])))
    (big, w_big), (acc, w_acc) = runs
    assert acc["lm_loss"] == pytest.approx(big["lm_loss"], rel=1e-6)
    assert acc["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-5)  # the same accumulated gradient
    # Adam's first step is about lr * sign(g): where |g| is tiny, float rounding shows; 1e-4 = 1 % of lr
    assert (w_big - w_acc).abs().max().item() < 1e-4


def test_fit_learns_logs_and_saves(tmp_path):
    records = []
    model = tiny_model()
    cfg = TrainConfig(batch_size=8, epochs=3, learning_rate=1e-2, warmup_iters=2, log_interval=5, eval_interval=10)
    trainer = Trainer(model, RandomBlocks(80), cfg, val_data=RandomBlocks(16, seed=1), ckpt_path=tmp_path / "pretrain_32.pth",
                      log=records.append)
    history = trainer.fit()
    assert trainer.steps_per_epoch == 10 and trainer.total_steps == 30 and trainer.epoch == 3
    assert history == records
    logs = [r for r in history if "lm_loss" in r]
    assert [r["step"] for r in logs] == [5, 10, 15, 20, 25, 30]
    assert {"lm_loss", "lr", "grad_norm", "tokens_per_s", "epoch"} <= set(logs[0]) and "aux_loss" not in logs[0]
    vals = [r for r in history if "val_loss" in r]
    assert [r["step"] for r in vals] == [0, 10, 20, 30]
    assert vals[0]["val_loss"] == pytest.approx(math.log(VOCAB), abs=0.5)  # tied embeddings favour repeats at init
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] - 0.5
    reloaded = LLM.from_checkpoint(tmp_path / "pretrain_32.pth")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
    assert all(v.dtype == torch.float32 for v in torch.load(tmp_path / "pretrain_32.pth", weights_only=True)["model"].values())
    state = torch.load(resume_path(tmp_path / "pretrain_32.pth"), weights_only=True)
    assert state["step"] == 30 and state["epoch"] == 3 and state["batch_in_epoch"] == 0


def test_metrics_are_measured_with_each_validation():
    calls = []

    def metric(m):
        calls.append((m, m.training))
        return 0.5 + len(calls)

    model = tiny_model()
    cfg = TrainConfig(batch_size=8, epochs=1, learning_rate=1e-2, log_interval=5, eval_interval=4)
    history = Trainer(model, RandomBlocks(80), cfg, val_data=RandomBlocks(16, seed=1), metrics={"probe": metric}).fit()
    vals = [r for r in history if "val_loss" in r]
    assert [r["step"] for r in vals] == [0, 4, 8, 10]
    assert [r["probe"] for r in vals] == [1.5, 2.5, 3.5, 4.5]  # measured once per validation, in order
    assert all(m is model for m, _ in calls) and all("probe" not in r for r in history if "lm_loss" in r)


class Killed(Exception):
    pass


def _run(folder, kill_at=None, resume=False, seed=0, accumulation_steps=2):
    model = tiny_model(seed, dropout=0.1)  # dropout: the RNG state must be restored too
    cfg = TrainConfig(batch_size=4, epochs=2, learning_rate=1e-2, warmup_iters=3, accumulation_steps=accumulation_steps,
                      log_interval=1, save_interval=4, eval_interval=5)

    def log(record):
        if record["step"] == kill_at and "lm_loss" in record:
            raise Killed()

    trainer = Trainer(model, RandomBlocks(40), cfg, val_data=RandomBlocks(8, seed=1), ckpt_path=Path(folder) / "m.pth", log=log)
    if resume:
        assert trainer.resume()
    try:
        trainer.fit()
    except Killed:
        return None
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in trainer.history]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight = _run(tmp_path / "a")
    assert _run(tmp_path / "b", kill_at=7) is None  # dies after step 7; the last save was at step 4
    assert torch.load(tmp_path / "b" / "m_resume.pth", weights_only=True)["step"] == 4
    resumed = _run(tmp_path / "b", resume=True, seed=123)  # another init: everything must come from the file
    assert resumed == straight  # bit-identical losses, learning rates, gradient norms, validation losses
    assert [r["step"] for r in straight if "lm_loss" in r][-1] == 10  # crossed an epoch boundary (5 steps per epoch)


def test_resume_refuses_a_different_setup(tmp_path):
    _run(tmp_path)
    other = Trainer(tiny_model(dropout=0.1), RandomBlocks(40), TrainConfig(batch_size=4, accumulation_steps=2),
                    ckpt_path=tmp_path / "m.pth")
    other.raw_model.config.n_layers = 2  # pretend another architecture
    with pytest.raises(ValueError, match="different model"):
        other.resume()
    other = Trainer(tiny_model(dropout=0.1), RandomBlocks(40), TrainConfig(batch_size=8), ckpt_path=tmp_path / "m.pth")
    with pytest.raises(ValueError, match="batch_size 4 then, 8 now; accumulation_steps 2 then, 1 now; epochs 2 then"):
        other.resume()
    changed = TrainConfig(batch_size=4, epochs=2, accumulation_steps=2, seed=7, max_steps=6)
    other = Trainer(tiny_model(dropout=0.1), RandomBlocks(48), changed, ckpt_path=tmp_path / "m.pth")
    with pytest.raises(ValueError) as refused:
        other.resume()
    assert str(refused.value).startswith("the resume state belongs to another run (seed 42 then, 7 now; max_steps None "
                                         "then, 6 now; training examples 40 then, 48 now)"), refused.value
    LLM(tiny_model().config).save_checkpoint(tmp_path / "m_resume.pth")  # a model checkpoint copied over it
    with pytest.raises(ValueError, match="is not a resume state .it lacks batch_in_epoch, epoch, history"):
        other.resume()
    (tmp_path / "m_resume.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read the resume state"):
        other.resume()
    assert Trainer(tiny_model(), RandomBlocks(40), TrainConfig(batch_size=4), ckpt_path=tmp_path / "new.pth").resume() is False


def test_resume_refuses_other_data(tmp_path):
    """Same number of examples, another file: the data id (train.py: the file's name and size) tells them apart."""
    cfg = TrainConfig(batch_size=4, max_steps=2)
    Trainer(tiny_model(), RandomBlocks(40), cfg, ckpt_path=tmp_path / "m.pth", data_id="a.jsonl (100 bytes)").fit()
    other = Trainer(tiny_model(), RandomBlocks(40), cfg, ckpt_path=tmp_path / "m.pth", data_id="b.jsonl (100 bytes)")
    with pytest.raises(ValueError, match=r"\(data a.jsonl \(100 bytes\) then, b.jsonl \(100 bytes\) now\)"):
        other.resume()
    same = Trainer(tiny_model(), RandomBlocks(40), cfg, ckpt_path=tmp_path / "m.pth", data_id="a.jsonl (100 bytes)")
    assert same.resume() and same.step == 2


def test_saving_moves_no_random_generator(tmp_path):
    """A save_model that draws random numbers (as building a layer does) must not change the run: the losses with a
    save every step equal those with a save at the end only."""
    def drawing_save(model, path):
        torch.nn.Linear(8, 8)  # initialising draws from the global generator
        model.save_checkpoint(path)

    def losses(save_interval):
        cfg = TrainConfig(batch_size=4, max_steps=6, log_interval=1, save_interval=save_interval)
        trainer = Trainer(tiny_model(dropout=0.1), RandomBlocks(40), cfg, ckpt_path=tmp_path / f"{save_interval}.pth",
                          save_model=drawing_save)
        return [r["lm_loss"] for r in trainer.fit()]

    assert losses(1) == losses(0)


def test_stale_temporary_files_are_removed(tmp_path):
    """kill -9 during a save leaves `.m.pth.<random>.tmp` behind; the next run of the same names deletes them."""
    stale = [tmp_path / ".m.pth.abc123.tmp", tmp_path / ".m_resume.pth.x_9.tmp"]
    others = [tmp_path / ".other.pth.abc123.tmp", tmp_path / "m.pth.tmp"]
    for path in stale + others:
        path.write_bytes(b"half a checkpoint")
    Trainer(tiny_model(), RandomBlocks(40), TrainConfig(batch_size=4, max_steps=1), ckpt_path=tmp_path / "m.pth").fit()
    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["m.pth", "m_resume.pth"]


class NaNAfter(torch.nn.Module):
    """Wraps a model; from the `bad_step`-th forward on, the loss is NaN."""

    def __init__(self, model, bad_step):
        super().__init__()
        self.inner, self.calls, self.bad_step, self.config = model, 0, bad_step, model.config

    def forward(self, input_ids, labels=None, **kwargs):
        self.calls += 1
        out = self.inner(input_ids, labels=labels, **kwargs)
        if self.training and self.calls >= self.bad_step:
            out.lm_loss = out.lm_loss * float("nan")
        return out

    def save_checkpoint(self, path):
        return self.inner.save_checkpoint(path)


def test_nan_loss_stops_without_touching_the_checkpoint(tmp_path):
    model = NaNAfter(tiny_model(), bad_step=4)
    cfg = TrainConfig(batch_size=8, max_steps=10, save_interval=2, learning_rate=1e-2)
    trainer = Trainer(model, RandomBlocks(80), cfg, ckpt_path=tmp_path / "m.pth")
    with pytest.raises(FloatingPointError, match="loss is nan .* at step 4"):
        trainer.fit()
    state = torch.load(tmp_path / "m_resume.pth", weights_only=True)
    assert state["step"] == 2  # the last good save
    assert all(torch.isfinite(v).all() for v in torch.load(tmp_path / "m.pth", weights_only=True)["model"].values())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "no temporary file left behind"


def test_too_little_data_and_float16_on_cpu(tmp_path):
    with pytest.raises(ValueError, match="too few for one optimizer step"):
        Trainer(tiny_model(), RandomBlocks(6), TrainConfig(batch_size=4, accumulation_steps=2))
    model = tiny_model()
    trainer = Trainer(model, RandomBlocks(32), TrainConfig(batch_size=8, max_steps=2, dtype="float16"),
                      ckpt_path=tmp_path / "m.pth")
    assert trainer.scaler.is_enabled()
    history = trainer.fit()
    assert all(math.isfinite(r["lm_loss"]) for r in history if "lm_loss" in r)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32


def test_only_trainable_parameters_move():
    model = tiny_model()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("layers.0.self_attn"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(model, RandomBlocks(32), TrainConfig(batch_size=8, max_steps=2, learning_rate=1e-2)).fit()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != n.startswith("layers.0.self_attn"), n


# ---- one optimizer step's loss is the token mean over the whole step (accumulation, DDP, padding) -------------
class Conversations(Dataset):
    """SFT-like examples of different lengths, each with its own number of labelled tokens (the rest -100);
    batched by SFTDataset's own `collate` (right padding to the longest example, attention mask)."""

    def __init__(self, n: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.tokenizer = SimpleNamespace(pad_id=0)  # what SFTDataset.collate reads
        self.items = []
        for _ in range(n):
            length = int(torch.randint(5, 16, (1,), generator=g))
            x = torch.randint(3, VOCAB, (length,), generator=g)
            y = x.clone()
            y[:int(torch.randint(1, length - 1, (1,), generator=g))] = IGNORE_INDEX
            self.items.append((x, y))

    collate = SFTDataset.collate

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _one_step(batch_size: int, accumulation_steps: int, use_moe: bool = False):
    """Weights and gradient after one optimizer step on the same 4 examples, split as asked."""
    model = tiny_model(use_moe=use_moe)
    trainer = Trainer(model, Conversations(), TrainConfig(batch_size=batch_size, accumulation_steps=accumulation_steps,
                                                          max_steps=1, learning_rate=1e-3, grad_clip=0, log_interval=1))
    grads = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: grads.append(torch.cat([p.grad.flatten() for p in model.parameters()])) \
        or step(*a, **k)
    record = trainer.fit()[-1]
    return torch.cat([p.detach().flatten() for p in model.parameters()]), grads[0], record


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_step_loss_does_not_depend_on_how_the_batch_is_split(use_moe):
    """Defect: a mean of per-micro-batch means weighted tokens by 1/(their micro-batch's count), so 2x1 and 1x2 gave
    different gradients (grad norm 1.92 vs 3.09 reported). Now the same 4 examples give the same step."""
    runs = {split: _one_step(*split, use_moe=use_moe) for split in ((4, 1), (2, 2), (1, 4))}
    (w0, g0, r0) = runs[(4, 1)]
    for split, (w, g, r) in runs.items():
        torch.testing.assert_close(g, g0, atol=1e-6, rtol=0, msg=f"gradient of split {split}")
        torch.testing.assert_close(w, w0, atol=1e-6, rtol=0, msg=f"weights of split {split}")
        assert r["lm_loss"] == pytest.approx(r0["lm_loss"], rel=1e-6)
    data = Conversations()
    x, y, mask = data.collate([data[i] for i in range(len(data))])
    model = tiny_model(use_moe=use_moe)
    expected = 0.0
    for i in range(4):  # the step's loss by hand: every labelled token of the 4 examples weighs the same
        order = list(torch.utils.data.DistributedSampler(data, 1, 0, seed=42, drop_last=True))
    chosen = order[:4]
    xs, ys, ms = data.collate([data[i] for i in chosen])
    with torch.no_grad():
        expected = model(xs, labels=ys, attention_mask=ms).lm_loss.item()
    assert r0["lm_loss"] == pytest.approx(expected, rel=1e-6)
    assert r0["tokens_per_s"] > 0 and ("aux_loss" in r0) == use_moe


def _ddp_train(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    model = tiny_model()
    trainer = Trainer(model, Conversations(), TrainConfig(batch_size=2, accumulation_steps=1, max_steps=1,
                                                          learning_rate=1e-3, grad_clip=0, log_interval=1))
    record = trainer.fit()[-1]
    if rank == 0:
        torch.save({"weights": torch.cat([p.detach().flatten() for p in model.parameters()]),
                    "lm_loss": record["lm_loss"]}, out)


def _ddp_step(rank: int, world_size: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        _ddp_train(rank, out)
    finally:  # the DDP wrapper is gone before the group (see zer02llm.train.teardown_distributed)
        gc.collect()
        dist.destroy_process_group()


def test_step_loss_over_two_gloo_ranks_equals_one_process(tmp_path):
    """2 processes x 2 examples (DDP, gloo) must take the step that 1 process takes on the same 4 examples."""
    mp.start_processes(_ddp_step, args=(2, str(tmp_path / "store"), str(tmp_path / "ddp.pt")), nprocs=2,
                       join=True, start_method="spawn")
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    w, _, record = _one_step(4, 1)
    torch.testing.assert_close(ddp["weights"], w, atol=1e-6, rtol=0)
    assert ddp["lm_loss"] == pytest.approx(record["lm_loss"], rel=1e-6)


def test_validation_is_the_lm_loss_per_labelled_token():
    data = Conversations()
    model = tiny_model(use_moe=True)
    trainer = Trainer(model, data, TrainConfig(batch_size=4, max_steps=1, eval_batches=1), val_data=data)
    x, y, mask = data.collate([data[i] for i in range(4)])
    with torch.no_grad():
        expected = model.eval()(x, labels=y, attention_mask=mask).lm_loss.item()
    assert trainer.evaluate() == pytest.approx(expected, rel=1e-6)


def test_tokens_per_second_counts_real_tokens_only():
    data = Conversations()
    trainer = Trainer(tiny_model(), data, TrainConfig(batch_size=4, max_steps=1))
    from zer02llm.data import make_loader

    result = trainer.train_step(iter(make_loader(data, 4, seed=trainer.cfg.seed)))
    chosen = list(torch.utils.data.DistributedSampler(data, 1, 0, seed=trainer.cfg.seed, drop_last=True))[:4]
    assert result["tokens"] == sum(len(data[i][0]) for i in chosen) < 4 * max(len(x) for x, _ in data.items)


# ---- resume on another device ---------------------------------------------------------------------------------
def test_resume_reads_the_state_on_the_cpu(tmp_path):
    """Defect: the resume state was loaded with map_location=<device>, so on a GPU the RNG states became CUDA
    tensors and torch.set_rng_state refused them. The meta device takes the GPU's place here: the same path
    (weights and optimizer moved to the model's device, generator states kept on the CPU) must work for it."""
    cfg = TrainConfig(batch_size=4, max_steps=2, learning_rate=1e-2)
    untied = dict(dropout=0.1, tie_word_embeddings=False)  # (moving to meta would untie a tied head)
    Trainer(tiny_model(**untied), RandomBlocks(16), cfg, ckpt_path=tmp_path / "m.pth").fit()
    elsewhere = Trainer(tiny_model(**untied), RandomBlocks(16), cfg, device="meta", ckpt_path=tmp_path / "m.pth")
    with pytest.warns(UserWarning, match="meta"):  # copying into meta tensors does nothing, and torch says so
        assert elsewhere.resume()
    assert elsewhere.step == 2
    moments = [s for s in elsewhere.optimizer.state.values() if "exp_avg" in s]
    assert moments and all(s["exp_avg"].device.type == "meta" for s in moments)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_cuda_reproduces_the_uninterrupted_run(tmp_path):
    def run(folder, kill_at=None, resume=False, seed=0):
        model = tiny_model(seed, dropout=0.1)
        cfg = TrainConfig(batch_size=4, learning_rate=1e-2, max_steps=8, log_interval=1, save_interval=4)

        def log(record):
            if record["step"] == kill_at:
                raise Killed()

        trainer = Trainer(model, RandomBlocks(64), cfg, device="cuda", ckpt_path=Path(folder) / "m.pth", log=log)
        if resume:
            assert trainer.resume()
        try:
            return [r["lm_loss"] for r in trainer.fit() if "lm_loss" in r]
        except Killed:
            return None

    straight = run(tmp_path / "a")
    assert run(tmp_path / "b", kill_at=5) is None
    assert run(tmp_path / "b", resume=True, seed=1) == straight
