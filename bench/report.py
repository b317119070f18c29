"""Results: the printed table, results.json / results.csv, and the plot."""
import csv
import json
import math
from pathlib import Path

from bench.tasks import COMPILED, FAST, HF, OURS
from bench.timing import median

IMPLS = (HF, OURS, FAST, COMPILED)


def row(bench: str, unit: str, values: dict[str, list[float]], higher_is_better: bool, target: dict | None = None,
        note: str = "", show_note: bool = False) -> dict:
    """One benchmark: raw per-round values, medians and the advantage over transformers (> 1 = better than HF)."""
    med = {k: median(v) for k, v in values.items()}
    ref = med.get(HF)
    adv = {}
    for k, m in med.items():
        if k != HF and ref and m and not math.isnan(m) and not math.isnan(ref):
            adv[k] = m / ref if higher_is_better else ref / m
    return {"bench": bench, "unit": unit, "higher_is_better": higher_is_better, "values": values, "median": med,
            "x_hf": adv, "target": target or {}, "note": note, "show_note": show_note}


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def table(rows: list[dict], header: str) -> str:
    impls = [i for i in IMPLS if any(i in r["median"] for r in rows)]
    cols = ["benchmark", "unit"] + [c for i in impls for c in ([i] if i == HF else [i, "×HF", "target"])]
    lines = []
    for r in rows:
        cells = [r["bench"], r["unit"]]
        for i in impls:
            cells.append(_fmt(r["median"].get(i)))
            if i != HF:
                a = r["x_hf"].get(i)
                t = r["target"].get(i)
                shown = t and r["median"].get(i) is not None  # a target only where this implementation ran
                cells += [f"{a:.2f}×" if a else "-", (f"≥{t:.2f}×" + (" ok" if a and a >= t else " MISSED")) if shown else ""]
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if j < 2 else str(c).rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))
    out = [header, "", fmt(cols), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines]
    out.append("")
    out += [f"{r['bench']}: {r['note']}" for r in rows if r.get("show_note")]
    out.append("×HF: how many times better than transformers (tokens/s ratio; for ms/token and MB the inverse ratio).")
    return "\n".join(out)


def write(out_dir: Path, rows: list[dict], info: dict, text: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "csv": out_dir / "results.csv", "table": out_dir / "table.txt"}
    paths["json"].write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    paths["table"].write_text(text + "\n")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["bench", "unit", "impl", "median", "x_hf", "rounds"])
        for r in rows:
            for impl, m in r["median"].items():
                a = r["x_hf"].get(impl)
                w.writerow([r["bench"], r["unit"], impl, f"{m:.4g}", f"{a:.3f}" if a else "", len(r["values"][impl])])
    paths["png"] = plot(rows, out_dir / "bench.png", info)
    return paths


def plot(rows: list[dict], path: Path, info: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only (this never runs inside a notebook)
    import matplotlib.pyplot as plt

    ctx = [r for r in rows if r["bench"].startswith("decode @ context")]
    other = [r for r in rows if r not in ctx and r["x_hf"]]
    fig, axes = plt.subplots(1, 2 if ctx else 1, figsize=(13 if ctx else 7, 0.45 * len(other) + 2.2), squeeze=False)
    ax = axes[0][0]
    labels = [r["bench"] for r in other][::-1]
    y = range(len(labels))
    present = [(impl, color) for impl, color in ((OURS, "tab:blue"), (COMPILED, "tab:green")) if any(impl in r["x_hf"] for r in other)]
    for k, (impl, color) in enumerate(present):
        vals = [r["x_hf"].get(impl, 0) for r in other][::-1]
        offset = (k - (len(present) - 1) / 2) * 0.38
        ax.barh([i + offset for i in y], vals, height=0.36, color=color, label=impl)
        for i, v in zip(y, vals):
            if v:
                ax.text(v, i + offset, f" {v:.2f}×", va="center", fontsize=7)
    ax.axvline(1.0, color="tab:red", lw=1, label=f"{HF} = 1")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.set_xlabel("× transformers (higher = better)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("zer02llm vs transformers, identical weights", fontsize=10)
    if ctx:
        ax2 = axes[0][1]
        xs = [int(r["bench"].split()[-1]) for r in ctx]
        for impl, color in ((HF, "tab:red"), (OURS, "tab:blue"), (COMPILED, "tab:green")):
            ys = [r["median"].get(impl) for r in ctx]
            if all(v is not None and not math.isnan(v) for v in ys):
                ax2.plot(xs, ys, "o-", color=color, label=impl)
        ax2.set_xscale("log", base=2)
        ax2.set_xticks(xs, [str(x) for x in xs])
        ax2.set_ylim(bottom=0)
        ax2.set_xlabel("context (tokens already in the KV cache)")
        ax2.set_ylabel("ms per new token (batch 1)")
        ax2.legend(fontsize=8)
        ax2.set_title("decode cost per token vs context", fontsize=10)
    fig.suptitle(f"{info.get('cpu', '?')}, {info.get('cores', '?')} cores; torch {info.get('torch')}, "
                 f"transformers {info.get('transformers')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
