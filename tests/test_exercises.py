"""Grade exercise notebooks. Learners: `pytest tests/test_exercises.py --nb-dir exercises -k 01_rmsnorm`.

By default (`--nb-dir solutions`) this proves the reference solutions pass every check.
`test_checks_fail_on_unsolved_exercises` proves each check fails on the untouched `exercises/` stubs,
so no check is vacuous.
"""
from pathlib import Path

import pytest

from graders import all_checks
from grading import NotebookRun, run_notebook

ROOT = Path(__file__).resolve().parents[1]
CHECKS = all_checks()
_runs: dict[Path, NotebookRun] = {}


def _run(path: Path) -> NotebookRun:
    if path not in _runs:
        if not path.exists():
            pytest.fail(f"{path} does not exist")
        _runs[path] = run_notebook(path)
    return _runs[path]


@pytest.mark.parametrize("notebook,name,check", CHECKS, ids=[f"{nb.split('_exercises')[0]}::{n}" for nb, n, _ in CHECKS])
def test_exercise(notebook, name, check, request):
    nb_dir = ROOT / request.config.getoption("--nb-dir")
    check(_run(nb_dir / notebook))


@pytest.mark.parametrize("notebook,name,check", CHECKS, ids=[f"{nb.split('_exercises')[0]}::{n}" for nb, n, _ in CHECKS])
def test_checks_fail_on_unsolved_exercises(notebook, name, check):
    with pytest.raises(AssertionError):
        check(_run(ROOT / "exercises" / notebook))


def test_every_solution_notebook_has_a_grader():
    graded = {nb for nb, _, _ in CHECKS}
    solutions = {p.name for p in (ROOT / "solutions").glob("*.ipynb")}
    assert solutions == graded, f"solutions without graders: {solutions - graded}; graders without solutions: {graded - solutions}"
