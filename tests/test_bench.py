"""The benchmark harness (bench/) still runs: its smoke mode on tiny configs. No timing is asserted anywhere."""
import json
import math

import numpy as np
import pytest
import torch

from bench import memory, models, stories
from bench.run import main
from zer02llm import corpus
from zer02llm.tokenizer import load_tokenizer


def test_quick_run_writes_results(tmp_path):
    rows = main(["--quick", "--only", "train,moe,sft,decode,context", "--out", str(tmp_path)])
    names = [r["bench"] for r in rows]
    assert [" ".join(n.split()[:2]) for n in names] == ["train dense", "train MoE", "train SFT", "decode B1",
                                                         "decode @", "decode @"], names
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["machine"]["quick"] and len(data["rows"]) == len(rows)
    for r in data["rows"]:
        want = ({"zer02llm"} if "SFT" in r["bench"] else {"transformers", "zer02llm", "zer02llm fast"}
                if r["bench"].startswith("decode") else {"transformers", "zer02llm"})
        assert set(r["median"]) == want, r["bench"]
        assert all(v > 0 and math.isfinite(v) for v in r["median"].values()), r
        assert "SFT" in r["bench"] or r["x_hf"]["zer02llm"] > 0
    sft = next(r for r in data["rows"] if "SFT" in r["bench"])
    assert "padded to 64 (before)" in sft["note"] and "speed-up" in sft["note"]
    assert (tmp_path / "results.csv").read_text().startswith("bench,unit,impl,median")
    assert "×HF" in (tmp_path / "table.txt").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_memory_worker_reports_peaks(tmp_path, capsys):
    pair = models.make_pair(models.TINY, 64, tmp_path)
    args = ["--task", "decode", "--hf-dir", str(pair.hf_dir), "--ckpt", str(pair.ckpt), "--prompt", "4",
            "--new-tokens", "4"]
    threads = torch.get_num_threads()
    try:
        for impl in ("zer02llm", "zer02llm fast", "transformers"):
            result = memory.main(["--impl", impl, *args])
            assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
            if result["peak_rss_mb"] is not None:  # Linux
                assert result["peak_rss_mb"] >= result["rss_after_load_mb"] > 0
    finally:
        torch.set_num_threads(threads)


def test_pairs_share_weights_and_bad_arguments_fail(tmp_path):
    pair = models.make_pair(models.TINY_MOE, 64, tmp_path)
    assert type(pair.hf).__name__ == "MixtralForCausalLM" and pair.max_abs_logit_diff < 1e-4
    with pytest.raises(SystemExit):
        main(["--only", "nothing"])


def test_stories_row_and_table(tmp_path):
    out = tmp_path / "stories.jsonl"
    stories.main(["--cast", "wide", "--tokenizer", "retrained", "--align", "bos", "--steps", "2", "--eval_every", "1",
                  "--out", str(out)])
    row = json.loads(out.read_text())
    assert [c["step"] for c in row["copying"]] == [0, 1, 2] and 0 < row["copying"][0]["thing"] < 0.01
    assert row["vocab"] > 1300 and 0 <= row["stories"] <= 1 and sum(row["problems"].values()) > 0
    stories.main(["--table", "--out", str(out)])
    assert "wide cast, tokenizer retrained, align bos, steps 2" in stories.table(out)


def test_wide_cast_adds_words_the_shipped_tokenizer_splits():
    tok = load_tokenizer()
    new = [w for w in stories.WIDE_CAST.things if w not in corpus.FIRST_CAST.things]
    assert len(new) == 20 and sum(len(tok.encode(" " + w)) > 1 for w in new) >= len(new) // 2


def test_bos_aligned_blocks_start_documents():
    bos = 1
    stream = np.array([1, 5, 6, 2, 1, 7, 8, 9, 2, 1, 3, 2, 1, 4, 4, 4, 4, 4, 4, 2])
    blocks = stories.bos_aligned(stream, bos, 6).blocks.tolist()
    # doc 1 (4) + the start of doc 2; doc 2 whole (5) + the start of doc 3; doc 3 (3) + the start of doc 4; doc 4 cut
    assert blocks == [[1, 5, 6, 2, 1, 7], [1, 7, 8, 9, 2, 1], [1, 3, 2, 1, 4, 4], [1, 4, 4, 4, 4, 4]]
