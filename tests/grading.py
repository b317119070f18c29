"""Run a learner's exercise notebook and grade it with messages that say what is wrong.

Why in-process (IPython's InteractiveShell) and not a kernel: the graders get the learner's real tensors and
functions, not JSON copies, and a notebook runs in a fraction of a second. Every cell runs even when an
earlier one fails (an unfinished exercise must not hide the others); failures are kept per cell.
"""
from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import nbformat
import torch


@dataclass
class NotebookRun:
    path: Path
    ns: dict
    errors: list[tuple[int, str]] = field(default_factory=list)  # (cell index, "ErrorType: message")


def run_notebook(path: Path) -> NotebookRun:
    """Execute every code cell of `path` with cwd = its folder; return the namespace and cell errors."""
    import matplotlib

    matplotlib.use("Agg")  # in this process only: no window, no inline backend needed
    from IPython.core.interactiveshell import InteractiveShell

    class QuietShell(InteractiveShell):
        def enable_gui(self, gui=None):  # `%matplotlib inline` becomes harmless
            pass

        def enable_matplotlib(self, gui=None):
            return None, None

    shell = QuietShell()
    nb = nbformat.read(path, as_version=4)
    run = NotebookRun(path, shell.user_ns)
    old = os.getcwd()
    os.chdir(path.parent)
    try:
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                result = shell.run_cell(cell.source, silent=True, store_history=False)
            err = result.error_in_exec or result.error_before_exec
            if err is not None:
                run.errors.append((i, f"{type(err).__name__}: {err}"))
    finally:
        os.chdir(old)
        import matplotlib.pyplot as plt

        plt.close("all")
    return run


def get(run: NotebookRun, name: str, kind: str = "function") -> Any:
    """Fetch `name` from the learner's notebook, or fail saying it is missing."""
    __tracebackhide__ = True  # pytest shows the message, not the grader's internals
    if name not in run.ns:
        raise AssertionError(f"{run.path.name}: no {kind} named `{name}` - did you run/define the cell that "
                             "creates it?")
    return run.ns[name]


def invoke(what: str, fn: Callable, *args, **kwargs) -> Any:
    """Call a learner's function or method; an unfinished one (NotImplementedError) or a crash gets a plain message
    that names it."""
    __tracebackhide__ = True
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise AssertionError(f"{what} is not implemented yet: replace `raise NotImplementedError()` in its "
                             "cell") from None
    except Exception as e:  # a learner's bug: say where it came from
        raise AssertionError(f"{what} raised {type(e).__name__}: {e}") from e


def call(run: NotebookRun, name: str, *args, **kwargs) -> Any:
    """Call the learner's function `name` (see `invoke`)."""
    __tracebackhide__ = True
    fn = get(run, name)
    if not callable(fn):
        raise AssertionError(f"`{name}` should be callable, got {type(fn).__name__}")
    return invoke(f"`{name}`", fn, *args, **kwargs)


def assert_close(actual: Any, expected: torch.Tensor, what: str, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Compare tensors and, when they differ, say how: type, shape, dtype, the worst element and by how much."""
    __tracebackhide__ = True
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"{what}: expected a torch.Tensor, got {type(actual).__name__}")
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{what}: dtype {actual.dtype}, expected {expected.dtype}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if torch.isnan(a).any() and not torch.isnan(e).any():
        idx = tuple(int(i) for i in torch.nonzero(torch.isnan(a))[0])
        raise AssertionError(f"{what}: NaN at index {idx}")
    diff = (a - e).abs()
    bad = diff > atol + rtol * e.abs()
    if bad.any():
        flat = int(torch.argmax(torch.where(bad, diff, torch.zeros_like(diff))))
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements differ; worst at index {idx}: "
            f"got {a[idx].item():.6g}, expected {e[idx].item():.6g} (|diff| {diff[idx].item():.3g}, atol {atol}, "
            f"rtol {rtol})"
        )


Check = Callable[[NotebookRun], None]


Mistakes = Mapping[str, Any] | Sequence[tuple[str, Any]]
"""Known wrong answers: (what the learner did, the result it produces: a value, or a function that computes it)."""


def same(got: Any, want: Any, atol: float = 1e-5, rtol: float = 1e-5) -> bool:
    """`got` equals `want` (a tensor or a tuple of them): exactly for booleans, within the tolerance otherwise, NaNs
    in the same places counting as equal."""
    if isinstance(want, tuple):
        return (isinstance(got, tuple) and len(got) == len(want)
                and all(same(g, w, atol, rtol) for g, w in zip(got, want)))
    if not (isinstance(got, torch.Tensor) and got.shape == want.shape):
        return False
    if want.dtype == torch.bool:
        return got.dtype == torch.bool and torch.equal(got, want)
    return torch.allclose(got.detach().double(), want.detach().double(), atol=atol, rtol=rtol, equal_nan=True)


def gap(got: Any, want: Any) -> str:
    """How far the learner's answer is from the right one, measured, for a message."""
    if isinstance(want, tuple):
        return "; ".join(gap(g, w) for g, w in zip(got, want))
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return f"got {type(got).__name__} {tuple(getattr(got, 'shape', ()))}, expected shape {tuple(want.shape)}"
    if want.dtype == torch.bool:
        return f"{int((got != want).sum())} of {want.numel()} entries differ"
    g = got.detach().double()
    if torch.isnan(g).any() and not torch.isnan(want).any():
        return f"NaN in {int(torch.isnan(g).sum())} of {g.numel()} values"
    return f"max |yours - correct| = {(g - want.detach().double()).abs().max().item():.3g}"


def name_the_mistake(what: str, got: Any, want: Any, mistakes: Mistakes, atol: float = 1e-5,
                     rtol: float = 1e-5) -> None:
    """When `got` is wrong and reproduces a known mistake, fail saying which (with the measured gap). Mistakes that
    give the right answer on this input cannot be told apart from it and are skipped; functions are called only when
    needed. Returns when `got` is right or matches no known mistake (the caller checks further)."""
    __tracebackhide__ = True
    if same(got, want, atol, rtol):
        return
    for mistake, wrong in (mistakes.items() if isinstance(mistakes, Mapping) else mistakes):
        wrong = wrong() if callable(wrong) else wrong
        if not same(wrong, want, atol, rtol) and same(got, wrong, atol, rtol):
            raise AssertionError(f"{what}: {mistake} ({gap(got, want)})")


def expect(what: str, got: Any, want: Any, mistakes: Mistakes = (), atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """`got` must equal `want`: a known mistake is named (`name_the_mistake`), any other difference described."""
    __tracebackhide__ = True
    name_the_mistake(what, got, want, mistakes, atol, rtol)
    if isinstance(want, torch.Tensor) and want.dtype != torch.bool:
        assert_close(got, want, what, atol, rtol)
    elif not same(got, want, atol, rtol):
        raise AssertionError(f"{what}: {gap(got, want)}")
