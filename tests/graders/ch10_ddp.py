"""Grader for solutions|exercises/10_ddp_exercises.ipynb.

Part A (build it): data-parallel gradients by hand, run in two real processes (gloo) and compared with
DistributedDataParallel's on the same shards and with the whole batch's gradient in one process; the usual mistakes
are named. Part B: gradient averaging in two processes, the ring all-reduce simulation, and DistributedSampler's
index arithmetic.

The learner's functions live in this process, so the ranks are forked (a spawned process would have to import them
by name, and a notebook's functions have none).
"""
import gc
import multiprocessing
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from grading import NotebookRun, assert_close, call, get

NOTEBOOK = "10_ddp_exercises.ipynb"


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _fork_two_ranks(worker, fn, what: str) -> list[dict]:
    """Run worker(fn, rank, folder) in 2 forked processes; return what each saved, or fail with the rank's error."""
    import torch._dynamo  # noqa: F401  (DDP imports it on first use: once here, not once per rank after the fork)

    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as folder:
        procs = [ctx.Process(target=worker, args=(fn, r, folder)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
        if hung:
            raise AssertionError(f"{what} did not finish in 60 s in 2 processes: does every rank call "
                                 "dist.all_reduce on the same tensors, in the same order?")
        for r in range(2):
            error = Path(folder, f"error{r}.txt")
            if error.exists():
                last = error.read_text().strip().splitlines()[-1]
                if last.startswith("NotImplementedError"):
                    raise AssertionError(f"`{what}` is not implemented yet: replace `raise NotImplementedError()` "
                                         "in its cell")
                raise AssertionError(f"{what} raised on rank {r} of a 2-process run: {last}")
        return [torch.load(f"{folder}/result{r}.pt", weights_only=True) for r in range(2)]


# ---- A1: data-parallel gradients ---------------------------------------------------------------------------------
def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def _shard_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    F.mse_loss(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def _dp_worker(fn, rank: int, folder: str) -> None:
    """One rank: the learner's data_parallel_backward on the global batch, then DDP's gradient and the rank's own
    (unreduced) shard gradient for comparison; saves them with the rows the learner's model was run on."""
    try:
        torch.set_num_threads(1)  # no OpenMP pool in a forked child
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2,
                                timeout=timedelta(seconds=30))
        inputs, targets = _global_batch()
        model, seen = _model(), []
        model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
        fn(model, inputs.clone(), targets.clone())
        rows = [next((i for i in range(len(inputs)) if torch.equal(row, inputs[i])), -1)
                for row in (torch.cat(seen) if seen else [])]
        ddp = DistributedDataParallel(_model())
        result = {"ours": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
                  "weights": [p.detach().clone() for p in model.parameters()], "rows": rows,
                  "ddp": _shard_gradient(ddp, inputs[rank::2], targets[rank::2]),
                  "local": _shard_gradient(_model(), inputs[rank::2], targets[rank::2])}
        torch.save(result, f"{folder}/result{rank}.pt")
        del ddp
        gc.collect()  # the DDP wrapper must be gone before its group
        dist.destroy_process_group()
    except BaseException:
        Path(f"{folder}/error{rank}.txt").write_text(traceback.format_exc())
        raise


def check_data_parallel_backward(run: NotebookRun):
    fn = get(run, "data_parallel_backward")
    results = _fork_two_ranks(_dp_worker, fn, "data_parallel_backward")
    inputs, targets = _global_batch()
    start = _model()
    whole = _shard_gradient(_model(), inputs, targets)  # one process, the whole batch: the independent reference
    names = [n for n, _ in start.named_parameters()]
    for rank, res in enumerate(results):  # the data first: a wrong shard explains any gradient
        want_rows = list(range(rank, len(inputs), 2))
        if res["rows"] != want_rows:
            if results[0]["rows"] == results[1]["rows"] and sorted(res["rows"]) != list(range(len(inputs))):
                raise AssertionError(
                    f"both ranks ran the model on the same rows {res['rows']}: each rank used the same data shard, "
                    "so the ranks compute the same gradient and N processes do the work of one. Rank r of N takes "
                    f"rows r, r+N, r+2N, ... (inputs[rank::world_size]): rank {rank} needs {want_rows}")
            if sorted(res["rows"]) == list(range(len(inputs))):
                raise AssertionError(f"rank {rank} ran the model on the whole batch: take this rank's shard, rows "
                                     f"r, r+N, ... (inputs[rank::world_size]) = {want_rows}")
            raise AssertionError(f"rank {rank} ran the model on rows {res['rows']} of the batch; rank r of N takes "
                                 f"rows r, r+N, r+2N, ... (inputs[rank::world_size]) = {want_rows}")
    for rank, res in enumerate(results):
        if any(g is None for g in res["ours"]):
            raise AssertionError(f"rank {rank}: some parameters have no gradient: call backward() on the shard's loss")
        if any(not torch.equal(w, p.detach()) for w, p in zip(res["weights"], start.parameters())):
            raise AssertionError(f"rank {rank}'s weights changed: data_parallel_backward all-reduced the parameters "
                                 "instead of their gradients. The weights are already the same on every rank; it is "
                                 "the gradients (p.grad) that differ and must be averaged")
        close = lambda a, b: all(torch.allclose(x, y, atol=1e-6, rtol=1e-5) for x, y in zip(a, b))  # noqa: E731
        if not close(res["ours"], res["ddp"]):
            if close(res["ours"], [2 * g for g in res["ddp"]]):
                raise AssertionError(f"rank {rank}'s gradients are 2 x DDP's: dist.all_reduce sums over the ranks; "
                                     "divide by dist.get_world_size() to get the average")
            if close(res["ours"], res["local"]):
                raise AssertionError(
                    f"rank {rank}'s gradients are still its own shard's: nothing was all-reduced into p.grad. "
                    "all_reduce every parameter's gradient (not the parameter: all-reducing the weights, which "
                    "are identical on every rank, changes nothing), then divide by the world size")
        for name, g, d, w in zip(names, res["ours"], res["ddp"], whole):
            assert_close(g, d, f"rank {rank}'s gradient of {name} (vs DistributedDataParallel's)", atol=1e-6)
            assert_close(g, w, f"rank {rank}'s gradient of {name} (vs the whole batch's, in one process)", atol=1e-6)


# ---- Part B ------------------------------------------------------------------------------------------------------
def _data(rank):
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)


def _worker(fn, rank, folder):
    """Runs in a forked child: join a 2-process gloo group, backward on this rank's data, call the learner's fn."""
    try:
        torch.set_num_threads(1)  # no OpenMP pool in a forked child
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
        model = _model()
        x, y = _data(rank)
        (model(x) - y).pow(2).mean().backward()
        fn(model)
        torch.save({"grads": [p.grad for p in model.parameters()]}, f"{folder}/result{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        Path(f"{folder}/error{rank}.txt").write_text(traceback.format_exc())
        raise


def check_average_gradients(run: NotebookRun):
    grads = [r["grads"] for r in _fork_two_ranks(_worker, get(run, "average_gradients"), "average_gradients")]
    # reference: the gradient of the mean of both ranks' losses, in one process
    model = _model()
    losses = [(model(x) - y).pow(2).mean() for x, y in map(_data, range(2))]
    (sum(losses) / 2).backward()
    for rank in range(2):
        for (name, p), g in zip(model.named_parameters(), grads[rank]):
            assert_close(g, p.grad, f"rank {rank}'s averaged gradient of {name}", atol=1e-6)


def check_ring_allreduce(run: NotebookRun):
    for n, length in ((2, 6), (3, 12), (5, 20)):
        g = torch.Generator().manual_seed(n)
        vectors = [torch.randn(length, generator=g) for _ in range(n)]
        copies = [v.clone() for v in vectors]
        out = call(run, "ring_allreduce", vectors)
        if not (isinstance(out, tuple) and len(out) == 3):
            raise AssertionError("ring_allreduce should return (results, after_reduce_scatter, sent)")
        results, after, sent = out
        if any(not torch.equal(a, b) for a, b in zip(vectors, copies)):
            raise AssertionError("ring_allreduce changed its input vectors: work on copies")
        total = torch.stack(vectors).sum(0)
        for r in range(n):
            assert_close(results[r], total, f"N={n}: rank {r}'s result", atol=1e-5)
        c = length // n
        for r in range(n):
            k = (r + 1) % n
            assert_close(after[r][k * c:(k + 1) * c], total[k * c:(k + 1) * c],
                         f"N={n}: after the reduce-scatter, rank {r}'s chunk {k} (complete there)", atol=1e-5)
        if sent != 2 * (n - 1) * c:
            raise AssertionError(f"N={n}, L={length}: each rank sends 2(N-1) chunks of L/N = {2 * (n - 1) * c} "
                                 f"elements, got {sent}")


def check_shard_indices(run: NotebookRun):
    for n, world, epoch, seed, shuffle, drop_last in ((10, 3, 0, 0, True, False), (10, 3, 2, 5, True, True),
                                                      (7, 4, 1, 0, False, False), (23, 2, 3, 1, True, False),
                                                      (5, 8, 0, 0, True, False)):
        for rank in range(world):
            sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                         drop_last=drop_last)
            sampler.set_epoch(epoch)
            got = call(run, "shard_indices", n, world, rank, epoch, seed, shuffle, drop_last)
            if list(got) != list(sampler):
                raise AssertionError(f"shard_indices(n={n}, world_size={world}, rank={rank}, epoch={epoch}, "
                                     f"seed={seed}, shuffle={shuffle}, drop_last={drop_last}) = {list(got)}, "
                                     f"DistributedSampler gives {list(sampler)}")
