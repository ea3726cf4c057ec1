"""The serving benchmark end to end on a tiny model (``--quick``): llama.cpp at F32 and Q8_0, and vLLM."""

import json
import os

import pytest
from scripts_loader import load_script

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def serving_script():
    return load_script("benchmark_serving")


def test_quick_run_reports_llama_cpp_and_vllm_plain_against_pruned(serving_script, tmp_path):
    skip_vllm = not os.path.exists(serving_script.vllm_runner().vllm_python())
    report = serving_script.main(["--quick", "--output_dir", str(tmp_path), *(["--skip_vllm"] * skip_vllm)])
    assert report["heads"].startswith("6 -> 4 query heads, 3 -> 2 key/value heads")
    rows = report["llama_cpp"]
    assert [(row["quantization"], row["context"]) for row in rows] == [
        ("F32", 16), ("F32", 64), ("Q8_0", 16), ("Q8_0", 64)]
    for row in rows:
        assert row["pruned_file_bytes"] < row["plain_file_bytes"]
        assert row["plain_tokens_per_s"] > 0 and row["pruned_tokens_per_s"] > 0 and row["speedup"] > 0
        assert row["bytes_bound"] > 1
    assert rows[2]["plain_file_bytes"] < rows[0]["plain_file_bytes"]  # Q8_0 against F32
    if not skip_vllm:
        vllm = report["vllm"]
        assert vllm["concurrency_bound"] == pytest.approx(3 / 2)
        assert vllm["pruned"]["max_concurrency"] > vllm["plain"]["max_concurrency"]
        assert vllm["plain"]["tokens_per_s"] > 0 and vllm["pruned"]["tokens_per_s"] > 0
    assert json.loads((tmp_path / "serving.json").read_text())["llama_cpp"] == rows
    text = (tmp_path / "serving.md").read_text()
    assert "| Q8_0 | 64 |" in text and ("vLLM" in text) != skip_vllm
