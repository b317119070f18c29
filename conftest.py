"""Root pytest configuration: options must live here (pytest rejects them from tests/conftest.py)."""
import os
from pathlib import Path

# Before torch is imported (here and in every notebook kernel, which inherits the environment): with the default
# active OpenMP wait policy, tiny ops on a busy 2-core machine stall for milliseconds; passive waiting avoids it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent


def pytest_addoption(parser):
    parser.addoption(
        "--nb-dir",
        default="solutions",
        help="the folder of exercise notebooks tests/test_exercises.py grades (learners: exercises; default: the "
             "reference solutions, together with the checks that prove every grader can fail)",
    )


def pytest_collection_modifyitems(config, items):
    """Grading a learner's folder runs the graders only: the tests about the graders themselves (each fails on an
    unsolved stub, every solution has one) concern the course, and would report failures that are not the
    learner's."""
    if config.getoption("--nb-dir") == "solutions":
        return
    keep = [i for i in items if not (i.path.name == "test_exercises.py" and i.originalname != "test_exercise")]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


def pytest_configure(config):
    # nbval resolves the sanitize file from the current directory; anchor it to the repository.
    if getattr(config.option, "nbval_sanitize_with", "unset") is None:
        config.option.nbval_sanitize_with = str(ROOT / "tests" / "nbval_sanitize.cfg")
    if hasattr(config.option, "nbval_current_env"):
        config.option.nbval_current_env = True  # the notebooks' kernel is this environment's Python
    # A kernel inheriting MPLBACKEND=Agg shows no inline figures, and the stored figure outputs would differ.
    os.environ.pop("MPLBACKEND", None)
