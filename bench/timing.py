"""Round-robin timing: every implementation runs in the same process, in turn, after a warm-up."""
import gc
import statistics
import time
from collections.abc import Callable


def round_robin(fns: dict[str, Callable[[], float]], rounds: int, warmup: int | dict[str, int] = 1,
                log: Callable[[str], None] = print) -> dict[str, list[float]]:
    """Call every fn `warmup` times (an int, or one per name), then `rounds` times in turn, the first one rotating
    each round (A B C, B C A, ...).

    Each fn performs one unit of work and returns its own measurement (tokens/s, ms/token, ...); the load of a shared
    machine then hits every implementation alike, and the medians stay comparable.
    """
    names = list(fns)
    for name in names:
        n = warmup.get(name, 1) if isinstance(warmup, dict) else warmup
        for w in range(n):
            t = time.perf_counter()
            fns[name]()
            log(f"    warm-up {w + 1}/{n} {name}: {time.perf_counter() - t:.1f} s")
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()
            out[name].append(fns[name]())
        log("    round %d/%d: %s" % (r + 1, rounds, "  ".join(f"{n} {out[n][-1]:.4g}" for n in names)))
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Stopwatch:
    """`with Stopwatch() as sw: ...; sw.seconds`."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
