"""The row files of the sweeps (`bench/results/*.jsonl`): one JSON object a line, appended run by run."""
import json
from pathlib import Path


def append_row(path: Path, row: dict) -> None:
    """Add one run's row to `path` (created with its folder if missing) and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A markdown table of the rows' cells under the column titles (as bench/README.md shows them)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])
