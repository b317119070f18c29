"""Execute notebooks in their own folder and store fresh, clean outputs (what nbval later compares).

Why not `jupyter nbconvert --execute`: it also runs `# NBVAL_SKIP` cells, and it leaves volatile metadata
(timings, kernel versions) that would make every refresh a diff. Usage:
    python tools/refresh_notebooks.py notebooks/01_rmsnorm.ipynb solutions/01_rmsnorm_exercises.ipynb
    python tools/refresh_notebooks.py --clean-only notebooks/*.ipynb   # just normalise metadata
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the kernel inherits it; see conftest.py

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Keep what nbval needs (outputs, execution counts, ids, tags); drop what changes run to run."""
    nb.metadata = nbformat.from_dict({"kernelspec": KERNELSPEC, "language_info": {"name": "python"}})
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags")
        cell.metadata = nbformat.from_dict({"tags": tags} if tags else {})
        if cell.cell_type == "code":
            for out in cell.outputs:
                out.get("metadata", {}).pop("execution", None)
    return nb


def execute(path: Path, timeout: int = 600) -> None:
    nb = nbformat.read(path, as_version=4)
    env_backend = os.environ.pop("MPLBACKEND", None)  # inline figures vanish under Agg (see tooling notes)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    count = 0
    with client.setup_kernel(cwd=str(path.parent.resolve())):
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            cell.outputs, cell.execution_count = [], None
            if "NBVAL_SKIP" in cell.source or not cell.source.strip():
                continue
            raises = "NBVAL_RAISES_EXCEPTION" in cell.source
            try:
                client.execute_cell(cell, index, execution_count=count + 1)
            except CellExecutionError:
                if not raises:
                    raise
            count += 1
    if env_backend is not None:
        os.environ["MPLBACKEND"] = env_backend
    nbformat.write(clean(nb), path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--clean-only", action="store_true")
    ap.add_argument("--timeout", type=int, default=600)
    a = ap.parse_args()
    for p in a.paths:
        if a.clean_only:
            nbformat.write(clean(nbformat.read(p, as_version=4)), p)
        else:
            print(f"executing {p}", file=sys.stderr)
            execute(p, a.timeout)


if __name__ == "__main__":
    main()
