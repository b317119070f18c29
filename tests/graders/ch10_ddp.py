"""Grader for solutions|exercises/10_ddp_exercises.ipynb: gradient averaging in two real processes (gloo),
the ring all-reduce simulation, and DistributedSampler's index arithmetic."""
import math
import multiprocessing
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from grading import NotebookRun, assert_close, call, get

NOTEBOOK = "10_ddp_exercises.ipynb"


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


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
        torch.save([p.grad for p in model.parameters()], f"{folder}/grads{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        Path(f"{folder}/error{rank}.txt").write_text(traceback.format_exc())
        raise


def check_average_gradients(run: NotebookRun):
    fn = get(run, "average_gradients")
    ctx = multiprocessing.get_context("fork")  # the learner's function lives in this process: fork, don't pickle
    with tempfile.TemporaryDirectory() as folder:
        procs = [ctx.Process(target=_worker, args=(fn, r, folder)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        for p in procs:
            if p.is_alive():
                p.kill()
                raise AssertionError("average_gradients did not finish in 60 s in 2 processes: does every rank call "
                                     "dist.all_reduce on the same tensors, in the same order?")
        errors = [Path(folder, f"error{r}.txt") for r in range(2)]
        for e in errors:
            if e.exists():
                last = e.read_text().strip().splitlines()[-1]
                raise AssertionError(f"average_gradients raised in a 2-process run: {last}")
        grads = [torch.load(f"{folder}/grads{r}.pt", weights_only=True) for r in range(2)]
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
            raise AssertionError(f"N={n}, L={length}: each rank sends 2(N-1) chunks of L/N = {2 * (n - 1) * c} elements, got {sent}")


def check_shard_indices(run: NotebookRun):
    for n, world, epoch, seed, shuffle, drop_last in ((10, 3, 0, 0, True, False), (10, 3, 2, 5, True, True),
                                                      (7, 4, 1, 0, False, False), (23, 2, 3, 1, True, False), (5, 8, 0, 0, True, False)):
        for rank in range(world):
            sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
            sampler.set_epoch(epoch)
            got = call(run, "shard_indices", n, world, rank, epoch, seed, shuffle, drop_last)
            if list(got) != list(sampler):
                raise AssertionError(f"shard_indices(n={n}, world_size={world}, rank={rank}, epoch={epoch}, seed={seed}, "
                                     f"shuffle={shuffle}, drop_last={drop_last}) = {list(got)}, DistributedSampler gives {list(sampler)}")
