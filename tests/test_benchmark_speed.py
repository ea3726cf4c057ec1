"""The speed benchmark end to end on a tiny model (``--quick``), and its multiply-add count."""

import importlib.util
import json
import os

import pytest
from conftest import VOCAB

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "benchmark_speed.py")


@pytest.fixture(scope="module")
def speed_script():
    spec = importlib.util.spec_from_file_location("benchmark_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_writes_json_and_markdown(speed_script, tmp_path):
    # One thread: a tiny model gains nothing from two, and two threads crawl when other processes share the cores.
    results = speed_script.main(["--quick", "--threads", "1", "--output_dir", str(tmp_path)])

    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(saved) == {"command", "model", "machine", "settings", "variants", "levels"}
    assert saved["command"].endswith("--quick --threads 1 --output_dir " + str(tmp_path))
    assert {"torch", "threads", "cores"} <= set(saved["machine"]) and saved["machine"]["threads"] == 1
    levels = [0.0, 0.3, 0.5, 0.7]
    expected = {"plain"} | {f"{kind}@{level}" for level in levels for kind in ("gated", "compacted", "direct")}
    assert set(saved["variants"]) == expected
    for variant in saved["variants"].values():
        assert variant["prefill_tokens_per_s"] > 0 and variant["decode_tokens_per_s"] > 0
        assert len(variant["prefill_samples"]) == len(variant["decode_samples"]) == 2
    plain = saved["variants"]["plain"]
    assert [row["level"] for row in saved["levels"]] == levels
    for row in saved["levels"]:
        compacted, direct = saved["variants"][f"compacted@{row['level']}"], saved["variants"][f"direct@{row['level']}"]
        assert row["heads_kept_per_layer"] == 6 - round(row["level"] * 6)
        # The direct model has exactly the compacted model's shapes; the gated model computes everything.
        assert (direct["parameters"], direct["multiply_adds"]) == (compacted["parameters"], compacted["multiply_adds"])
        assert saved["variants"][f"gated@{row['level']}"]["multiply_adds"] == plain["multiply_adds"]
        assert row["predicted_prefill_speedup"] == pytest.approx(plain["multiply_adds"] / compacted["multiply_adds"])
        for key in ("compacted_vs_plain_prefill", "compacted_vs_direct_prefill", "compacted_vs_direct_decode",
                    "gated_vs_plain_prefill", "gated_vs_plain_decode", "achieved_over_predicted_speedup"):
            assert row[key] > 0
        if row["level"] > 0:
            assert compacted["parameters"] < plain["parameters"] and row["predicted_prefill_speedup"] > 1
    markdown = (tmp_path / "speed.md").read_text()
    assert "| variant | parameters |" in markdown and "| compacted/direct prefill |" in markdown
    assert sum(line.startswith("| compacted@") for line in markdown.splitlines()) == 4
    assert len([line for line in markdown.splitlines() if line.startswith("| 0.")]) == 4


def test_multiply_adds_of_the_quick_model(speed_script):
    model = speed_script.quick_model(None)  # 4 layers, hidden 96, 6 query heads and 2 key/value heads of 16, MLP 192
    batch, length = 2, 10
    tokens = batch * length
    per_token = 4 * (96 * 96 + 2 * 96 * 32 + 96 * 96 + 3 * 96 * 192) + 96 * VOCAB
    scores = 4 * 2 * 6 * 16 * batch * (length * (length + 1) // 2)
    assert speed_script.multiply_adds(model, batch, length) == tokens * per_token + scores
