"""The benchmark harness (bench/) still runs: its smoke mode on tiny configs. No timing is asserted anywhere."""
import json
import math

import pytest
import torch

from bench import memory, models
from bench.run import main


def test_quick_run_writes_results(tmp_path):
    rows = main(["--quick", "--only", "train,moe,sft,decode,context", "--out", str(tmp_path)])
    names = [r["bench"] for r in rows]
    assert [" ".join(n.split()[:2]) for n in names] == ["train dense", "train MoE", "train SFT", "decode B1", "decode @",
                                                         "decode @"], names
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
    args = ["--task", "decode", "--hf-dir", str(pair.hf_dir), "--ckpt", str(pair.ckpt), "--prompt", "4", "--new-tokens", "4"]
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
