"""Grade exercise notebooks. Learners: `pytest tests/test_exercises.py --nb-dir exercises -k 01_rmsnorm`.

By default (`--nb-dir solutions`) this proves the reference solutions pass every check, and
`test_checks_fail_on_unsolved_exercises` proves each check fails on the unsolved stubs (generated from the solutions,
as `exercises/` is), so no check is vacuous. With another `--nb-dir` only the graders run (see conftest.py).
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from graders import all_checks
from grading import NotebookRun, run_notebook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
CHECKS = all_checks()
IDS = [f"{nb.split('_exercises')[0]}::{n}" for nb, n, _ in CHECKS]
_runs: dict[Path, NotebookRun] = {}


def _run(path: Path) -> NotebookRun:
    if path not in _runs:
        if not path.exists():
            pytest.fail(f"{path} does not exist")
        _runs[path] = run_notebook(path)
    return _runs[path]


@pytest.mark.parametrize("notebook,name,check", CHECKS, ids=IDS)
def test_exercise(notebook, name, check, request):
    nb_dir = ROOT / request.config.getoption("--nb-dir")
    check(_run(nb_dir / notebook))


@pytest.fixture(scope="session")
def stubs(tmp_path_factory) -> Path:
    """The unsolved notebooks, generated from the solutions (not read from exercises/, which a learner edits)."""
    from strip_exercises import expected_exercises

    folder = tmp_path_factory.mktemp("stubs")
    for name, text in expected_exercises(ROOT).items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize("notebook,name,check", CHECKS, ids=IDS)
def test_checks_fail_on_unsolved_exercises(notebook, name, check, stubs):
    with pytest.raises(AssertionError):
        check(_run(stubs / notebook))


def grade(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """The learner's grading command, run on `folder`."""
    return subprocess.run([sys.executable, "-m", "pytest", "tests/test_exercises.py", "--nb-dir", str(folder), "-q",
                           "-p", "no:cacheprovider", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_correct_notebooks_grade_all_green(tmp_path):
    """Every solution, copied into a learner's exercises folder, passes the documented command with no failure."""
    folder = tmp_path / "exercises"
    shutil.copytree(ROOT / "solutions", folder)
    proc = grade(folder)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"{len(CHECKS)} passed" in proc.stdout and "failed" not in proc.stdout and "skipped" not in proc.stdout


def test_one_mistake_is_one_failure_that_names_it(tmp_path):
    """A learner's RMSNorm-chapter notebook with one wrong function: that check fails, with its reason; the others
    pass."""
    import nbformat

    folder = tmp_path / "exercises"
    folder.mkdir()
    nb = nbformat.read(ROOT / "solutions" / "01_rmsnorm_exercises.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and "def layer_norm(" in c.source)
    cell.source = cell.source.split("def layer_norm(")[0] + (
        "def layer_norm(x, weight, bias, eps=1e-5):\n"
        "    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + eps).sqrt() * weight + bias\n")
    nbformat.write(nb, folder / "01_rmsnorm_exercises.ipynb")
    proc = grade(folder, "-k", "01_rmsnorm")
    n = sum(nb_name.startswith("01_") for nb_name, _, _ in CHECKS)
    assert proc.returncode == 1 and f"1 failed, {n - 1} passed" in proc.stdout, proc.stdout[-3000:]
    assert "check_layer_norm" in proc.stdout and "unbiased variance" in proc.stdout, proc.stdout[-3000:]


def test_every_solution_notebook_has_a_grader():
    graded = {nb for nb, _, _ in CHECKS}
    solutions = {p.name for p in (ROOT / "solutions").glob("*.ipynb")}
    assert solutions == graded, (f"solutions without graders: {solutions - graded}; "
                                 f"graders without solutions: {graded - solutions}")
