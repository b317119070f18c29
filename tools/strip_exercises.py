"""Generate `exercises/` from `solutions/` by removing the solution regions (nbgrader's markers).

In a solution notebook, a code region between `### BEGIN SOLUTION` and `### END SOLUTION` becomes
`# YOUR CODE HERE` + `raise NotImplementedError()` at the same indentation; lines between
`### BEGIN HIDDEN TESTS` and `### END HIDDEN TESTS` are removed. Outputs and execution counts are cleared
(the learner produces them). Cell ids are kept, so `exercises/` diffs stay small.
    python tools/strip_exercises.py           # write exercises/
    python tools/strip_exercises.py --check   # exit 1 when exercises/ is stale (CI)
"""
import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def strip_source(source: str) -> str:
    out, mode = [], None
    for line in source.splitlines():
        marker = line.strip()
        if marker == "### BEGIN SOLUTION":
            indent = line[: len(line) - len(line.lstrip())]
            out += [f"{indent}# YOUR CODE HERE", f"{indent}raise NotImplementedError()"]
            mode = "solution"
        elif marker == "### BEGIN HIDDEN TESTS":
            mode = "hidden"
        elif marker in ("### END SOLUTION", "### END HIDDEN TESTS"):
            mode = None
        elif mode is None:
            out.append(line)
    if mode is not None:
        raise ValueError(f"unterminated {mode} region in:\n{source}")
    return "\n".join(out)


def strip_notebook(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    nb = nbformat.from_dict(nb)
    for cell in nb.cells:
        cell.source = strip_source(cell.source)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def expected_exercises(root: Path = ROOT) -> dict[str, str]:
    """Map exercise file name -> the JSON text it should have."""
    return {
        p.name: nbformat.writes(strip_notebook(nbformat.read(p, as_version=4))) + "\n"
        for p in sorted((root / "solutions").glob("*.ipynb"))
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    want = expected_exercises()
    out_dir = ROOT / "exercises"
    have = {p.name: p.read_text(encoding="utf-8") for p in out_dir.glob("*.ipynb")}
    stale = sorted(n for n in set(want) | set(have) if want.get(n) != have.get(n))
    if a.check:
        if stale:
            print("exercises/ is stale (run python tools/strip_exercises.py):", *stale, sep="\n  ")
            sys.exit(1)
        return
    for name in set(have) - set(want):
        (out_dir / name).unlink()
    for name, text in want.items():
        (out_dir / name).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
