"""Edit a notebook as plain text, and turn the text back into the notebook, keeping cell ids.

Why: notebooks are the course's source of truth, but JSON is a poor format to write prose and code in.
`python tools/nbpy.py to-py notebooks/01_rmsnorm.ipynb` writes `01_rmsnorm.py` (percent format) next to a
scratch location of your choice; `to-nb` reads it back. Cell ids travel in the `# %%` markers, so an edit
does not renumber cells (nbdev writes the ids into the exported modules). Outputs are not carried: run
`tools/refresh_notebooks.py` afterwards to execute the notebook and store fresh outputs.

Format:
    # %% [markdown] id=intro
    # # A title
    # Prose, each line prefixed by "# ".
    # %% id=code-1
    x = 1
"""
import argparse
import hashlib
import re
from pathlib import Path

import nbformat

MARKER = re.compile(r"^# %%(?: \[(?P<kind>markdown)\])?(?: id=(?P<id>[A-Za-z0-9_-]+))?\s*$")


def notebook_to_text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            body = "\n".join(("# " + line).rstrip() for line in cell.source.splitlines())
            parts.append(f"# %% [markdown] id={cell.id}\n{body}")
        elif cell.cell_type == "code":
            parts.append(f"# %% id={cell.id}\n{cell.source}")
    return "\n\n".join(parts) + "\n"


def _cell_id(stem: str, index: int, taken: set) -> str:
    base = hashlib.sha1(f"{stem}:{index}".encode()).hexdigest()[:8]
    cid, n = base, 0
    while cid in taken:
        n += 1
        cid = f"{base}-{n}"
    return cid


def text_to_notebook(text: str, stem: str, old: nbformat.NotebookNode | None = None) -> nbformat.NotebookNode:
    """Parse percent-format text; reuse outputs of unchanged code cells from `old` (matched by id and source)."""
    old_cells = {c.id: c for c in old.cells} if old is not None else {}
    chunks: list[tuple[str, str | None, list[str]]] = []
    for line in text.splitlines():
        m = MARKER.match(line)
        if m:
            chunks.append((m.group("kind") or "code", m.group("id"), []))
        elif chunks:
            chunks[-1][2].append(line)
    nb = nbformat.v4.new_notebook()
    taken: set = set()
    for i, (kind, cid, lines) in enumerate(chunks):
        while lines and not lines[-1].strip():
            lines.pop()
        if kind == "markdown":
            src = "\n".join(re.sub(r"^# ?", "", l) for l in lines)
            cell = nbformat.v4.new_markdown_cell(src)
        else:
            src = "\n".join(lines)
            cell = nbformat.v4.new_code_cell(src)
            prev = old_cells.get(cid)
            if prev is not None and prev.cell_type == "code" and prev.source == src:
                cell.outputs, cell.execution_count = prev.outputs, prev.execution_count
        cell.id = cid if cid and cid not in taken else _cell_id(stem, i, taken)
        taken.add(cell.id)
        nb.cells.append(cell)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    return nb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("direction", choices=["to-py", "to-nb"])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    a = ap.parse_args()
    if a.direction == "to-py":
        a.dst.write_text(notebook_to_text(nbformat.read(a.src, as_version=4)), encoding="utf-8")
    else:
        old = nbformat.read(a.dst, as_version=4) if a.dst.exists() else None
        nb = text_to_notebook(a.src.read_text(encoding="utf-8"), a.dst.stem, old)
        a.dst.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, a.dst)


if __name__ == "__main__":
    main()
