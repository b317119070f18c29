"""One function per benchmark: each builds the callables that `timing.round_robin` alternates."""
import time
from collections.abc import Callable

import torch

from bench.timing import median

HF, OURS, FAST, COMPILED = "transformers", "zer02llm", "zer02llm fast", "zer02llm+compile"
# decoding: OURS = `model.generate` (the readable forward step), FAST = `zer02llm.fast.generate` (chapter 11's lean
# CPU step), COMPILED = FAST with the lean step compiled; training: COMPILED = the blocks compiled


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The same AdamW for every implementation (fused kernel where this torch has one for the device)."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)


class TrainStep:
    """forward (LM loss + MoE load-balancing loss) + backward + AdamW step; a call returns tokens/s.

    `first_loss` keeps the loss of the first call, made from the initial weights: equal across implementations."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, hf_moe: bool = False,
                 autocast_dtype: torch.dtype | None = None):
        self.model, self.ids, self.autocast_dtype = model.train(), ids, autocast_dtype
        self.opt = make_optimizer(model)
        self.extra = {"output_router_logits": True} if hf_moe else {}  # transformers adds its aux loss only when asked
        self.first_loss: float | None = None

    def warm_up(self) -> None:
        """Forward + backward on one sequence, no optimizer step: the first-call costs (thread pools, kernels) are
        paid outside the timing, the weights stay as they were (see `first_loss`), and it costs 1/batch of a step."""
        with torch.autocast(self.ids.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            self.model(input_ids=self.ids[:1], labels=self.ids[:1], **self.extra).loss.backward()
        self.model.zero_grad(set_to_none=True)

    def __call__(self) -> float:
        device = self.ids.device
        _sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss = self.model(input_ids=self.ids, labels=self.ids, **self.extra).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(device)
        seconds = time.perf_counter() - t
        if self.first_loss is None:
            self.first_loss = loss.item()
        return self.ids.numel() / seconds


def check_first_losses(steps: dict[str, "TrainStep"], names: list[str], atol: float) -> str:
    """The implementations in `names` started from the same weights: their first losses must agree."""
    losses = {n: steps[n].first_loss for n in names if n in steps}
    ref = next(iter(losses.values()))
    bad = {n: v for n, v in losses.items() if abs(v - ref) > atol}
    if bad:
        raise AssertionError(f"first training losses differ: {losses}")
    return ", ".join(f"{n} {v:.5f}" for n, v in losses.items())


class _Clock:
    """A transformers streamer that only notes when each batch of tokens arrives."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_generate(model, prompt: torch.Tensor, n: int, streamer=None) -> torch.Tensor:
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0, streamer=streamer)


def ours_generate(model, prompt: torch.Tensor, n: int, lean: bool = False) -> torch.Tensor:
    from zer02llm import fast

    return (fast.generate if lean else type(model).generate)(model, prompt, max_new_tokens=n, temperature=0)


def decode_fns(models: dict, prompt: torch.Tensor, n: int) -> tuple[dict[str, Callable[[], float]], dict[str, torch.Tensor]]:
    """Greedy generation of n tokens after `prompt` -> tokens/s; also returns each implementation's tokens."""
    outputs: dict[str, torch.Tensor] = {}

    def make(name, model):
        def run() -> float:
            _sync(prompt.device)
            t = time.perf_counter()
            out = hf_generate(model, prompt, n) if name == HF else ours_generate(model, prompt, n, name != OURS)
            _sync(prompt.device)
            dt = time.perf_counter() - t
            outputs[name] = out
            return n / dt

        return run

    return {name: make(name, m) for name, m in models.items()}, outputs


def context_fns(models: dict, prompt: torch.Tensor, n: int) -> dict[str, Callable[[], float]]:
    """Median wall time between two consecutive new tokens (ms), after a prompt of len(prompt) tokens.

    The first token (which includes the prompt's forward pass) is left out: what remains is the cost of one cached
    decoding step at a context of about len(prompt) tokens."""

    def hf_run(model) -> float:
        clock = _Clock()
        hf_generate(model, prompt, n, streamer=clock)
        gaps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]  # times[0]: the prompt, times[1]: token 1
        return median(gaps) * 1e3

    def ours_run(model, lean: bool) -> float:
        from zer02llm import fast

        times = []
        for _ in (fast.stream_generate if lean else type(model).stream_generate)(model, prompt, n, temperature=0):
            times.append(time.perf_counter())
        return median([b - a for a, b in zip(times, times[1:])]) * 1e3

    return {name: (lambda m=m, k=name: hf_run(m) if k == HF else ours_run(m, k != OURS)) for name, m in models.items()}


class SFTStep:
    """One SFT optimizer step (forward + backward + AdamW) on a batch of conversations; a call returns real (not
    padding) tokens per second. `pad_to` pads every example to that length without a mask, as before per-batch
    padding; None uses `SFTDataset.collate` (pad to the longest example, attention mask)."""

    def __init__(self, model: torch.nn.Module, dataset, batches: list[list[int]], pad_to: int | None = None):
        self.model, self.opt = model.train(), make_optimizer(model)
        self.batches = [self._batch(dataset, idx, pad_to) for idx in batches]
        self.i = 0

    @staticmethod
    def _batch(dataset, idx: list[int], pad_to: int | None):
        x, y, mask = dataset.collate([dataset[i] for i in idx])
        if pad_to is None:
            return x, y, mask
        pad = pad_to - x.shape[1]
        return (torch.nn.functional.pad(x, (0, pad), value=dataset.tokenizer.pad_id),
                torch.nn.functional.pad(y, (0, pad), value=-100), None, int(mask.sum()))

    def __call__(self) -> float:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        x, y, mask = batch[:3]
        real = batch[3] if len(batch) == 4 else int(mask.sum())
        t = time.perf_counter()
        self.model(x, labels=y, attention_mask=mask).loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return real / (time.perf_counter() - t)
