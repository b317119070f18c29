"""One module per chapter: `NOTEBOOK` (the exercise file name) and `check_*` functions, run in file order.

A check takes the executed notebook (`grading.NotebookRun`) and raises AssertionError with a helpful message.
Adding a chapter's grader needs no registration: `all_checks()` discovers the modules.
"""
import importlib
import inspect
import pkgutil


def all_checks() -> list[tuple[str, str, object]]:
    """(notebook file name, check name, check function) for every chapter, in chapter order."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{__name__}.{info.name}")
        fns = [f for n, f in inspect.getmembers(mod, inspect.isfunction) if n.startswith("check_") and f.__module__ == mod.__name__]
        fns.sort(key=lambda f: f.__code__.co_firstlineno)
        found += [(mod.NOTEBOOK, f.__name__, f) for f in fns]
    return found
