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
        choices=["solutions", "exercises"],
        help="which exercise notebooks tests/test_exercises.py grades (learners: exercises)",
    )


def pytest_configure(config):
    # nbval resolves the sanitize file from the current directory; anchor it to the repository.
    if getattr(config.option, "nbval_sanitize_with", "unset") is None:
        config.option.nbval_sanitize_with = str(ROOT / "tests" / "nbval_sanitize.cfg")
    if hasattr(config.option, "nbval_current_env"):
        config.option.nbval_current_env = True  # the notebooks' kernel is this environment's Python
    # A kernel inheriting MPLBACKEND=Agg shows no inline figures, and the stored figure outputs would differ.
    os.environ.pop("MPLBACKEND", None)
