"""The speed benchmark end to end on a tiny model (``--quick``), its options, scopes and multiply-add count."""

import copy
import importlib.util
import json
import os

import pytest
import torch
from conftest import VOCAB

from sentinel_lightning.compaction import compact
from sentinel_lightning.gates import attach_gates

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "benchmark_speed.py")


@pytest.fixture(scope="module")
def speed_script():
    spec = importlib.util.spec_from_file_location("benchmark_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_sizes(row, plain, contexts):
    """Sizes against the plain model, and bounds recomputed from them."""
    assert row["parameters"] < plain["parameters"] and row["weight_bytes"] < plain["weight_bytes"]
    if row["unit"] == "head":  # uniform head pruning keeps every group, so every key/value head
        assert row["kv_cache_bytes_per_token"] <= plain["kv_cache_bytes_per_token"]
    else:
        assert row["kv_cache_bytes_per_token"] < plain["kv_cache_bytes_per_token"]
    assert row["prefill_bound"] == pytest.approx(plain["multiply_adds"] / row["multiply_adds"])
    assert row["prefill_bound"] > 1
    assert set(row["decode_bound"]) == set(row["decode_speedup"]) == {str(context) for context in contexts}
    for context in contexts:
        moved = [entry["weight_bytes"] + entry["kv_cache_bytes_per_token"] * context for entry in (plain, row)]
        assert row["decode_bound"][str(context)] == pytest.approx(moved[0] / moved[1])
        assert row["decode_bound"][str(context)] > 1 and row["decode_speedup"][str(context)] > 0


def test_quick_benchmark_writes_json_and_markdown(speed_script, tmp_path):
    # One thread: a tiny model gains nothing from two, and two threads crawl when other processes share the cores.
    results = speed_script.main(["--quick", "--threads", "1", "--output_dir", str(tmp_path)])

    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(saved) == {"command", "model", "machine", "settings", "plain", "configurations", "trade_off"}
    assert saved["command"].endswith("--quick --threads 1 --output_dir " + str(tmp_path))
    assert {"torch", "threads", "cores", "cpu"} <= set(saved["machine"]) and saved["machine"]["threads"] == 1
    contexts, plain = saved["settings"]["decode_contexts"], saved["plain"]
    assert contexts == [16, 64]
    rows = {(row["unit"], row["fraction"]): row for row in saved["configurations"] if row["scope"] != "global"
            or row["unit"] == "layer"}
    assert set(rows) == {(unit, fraction) for unit in ("head", "group", "layer") for fraction in (0.33, 0.67)}
    # Single heads pruned globally leave unequal groups: loaded through query slots, never more key/value heads.
    unequal, = [row for row in saved["configurations"] if row["name"] == "head@0.33 global"]
    assert not unequal["stock_modules"] and not unequal["equal_groups"]
    assert unequal["sparsity"] == pytest.approx(9 / 27)
    check_sizes(unequal, plain, contexts)
    assert unequal["perplexity_agrees"]
    for (unit, fraction), row in rows.items():
        # 3 layers of 9 query heads in 3 groups: every unit reaches 1/3 and 2/3 exactly, uniformly where it can.
        assert row["scope"] == ("global" if unit == "layer" else "uniform")
        assert row["stock_modules"] == (unit != "layer")  # uniform shapes load as the stock modules
        assert row["sparsity"] == pytest.approx(round(fraction * 3) / 3)
        check_sizes(row, plain, contexts)
        assert row["perplexity"] == pytest.approx(row["perplexity_gated"], rel=1e-3) and row["perplexity_agrees"]
        assert row["prefill_speedup"] > 0 and all(len(samples) == 2 for samples in row["samples"].values())
    # Whole groups cut the key/value cache to exactly 2/3 and 1/3; head pruning keeps it whole.
    assert rows["group", 0.33]["kv_cache_bytes_per_token"] * 3 == plain["kv_cache_bytes_per_token"] * 2
    assert rows["group", 0.67]["kv_cache_bytes_per_token"] * 3 == plain["kv_cache_bytes_per_token"]
    assert rows["head", 0.67]["kv_cache_bytes_per_token"] == plain["kv_cache_bytes_per_token"]
    assert rows["group", 0.33]["key_value_heads_per_layer"] == [2, 2, 2]
    assert rows["layer", 0.67]["heads_per_layer"].count(0) == 2
    assert plain["perplexity"] > 1 and plain["prefill_tokens_per_s"] > 0
    markdown = (tmp_path / "speed.md").read_text()
    assert "| unit | scope | query heads pruned | parameters | kv cache bytes/token |" in markdown
    assert "decode speed-up @64 (bound)" in markdown and "| model | prefill tokens/s |" in markdown
    assert sum(line.startswith(("| head |", "| group |", "| layer |")) for line in markdown.splitlines()) == 7
    assert markdown.rstrip().endswith(saved["trade_off"]) and saved["trade_off"].startswith("Trade-off")


def test_options_take_both_spellings_and_quick_defaults_yield(speed_script):
    args = speed_script.parse_args(["--quick", "--rounds", "1", "--decode-contexts", "8", "--perplexity_batches", "1"])
    assert (args.rounds, args.decode_contexts, args.perplexity_batches, args.decode_tokens) == (1, [8], 1, 4)
    full = speed_script.parse_args(["--fractions", "0.5", "--repeats", "3"])
    assert (full.fractions, full.rounds, full.decode_contexts, full.perplexity_batches) == ([0.5], 3, [256, 4096], None)
    for bad in (["--fractions", "1.0"], ["--rounds", "0"], ["--decode-contexts", "0"]):
        with pytest.raises(SystemExit):
            speed_script.parse_args(bad)


def test_contexts_beyond_the_model_fail_clearly(speed_script):
    args = speed_script.parse_args(["--quick", "--decode-contexts", "300"])  # the tiny model has 256 positions
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        speed_script.load_model(args)


def test_unit_scope_matches_fractions(speed_script):
    # SmolLM2-135M: 30 layers of 9 query heads in 3 groups; every unit reaches 90 and 180 heads.
    for fraction, count in ((0.33, 90), (0.67, 180)):
        assert speed_script.unit_scope("head", fraction, 30, 9, 3) == ("uniform", count)
        assert speed_script.unit_scope("group", fraction, 30, 9, 3) == ("uniform", count)
        assert speed_script.unit_scope("layer", fraction, 30, 9, 3) == ("global", count)
    # 4 layers of 6 heads in 2 groups: one group per layer (12 of 24 heads) is too far from 0.33 (7.9 heads).
    assert speed_script.unit_scope("group", 0.33, 4, 6, 3) == ("global", 9)
    assert speed_script.unit_scope("head", 0.33, 4, 6, 3) == ("uniform", 8)


def test_trade_off_names_the_best_units(speed_script):
    def row(unit, fraction, speed, perplexity):
        return {"name": f"{unit}@{fraction}", "unit": unit, "fraction": fraction, "perplexity": perplexity,
                "decode_speedup": {"64": speed}}

    rows = [row("head", 0.33, 1.0, 10.0), row("group", 0.33, 1.1, 12.0), row("layer", 0.33, 1.05, 13.0),
            row("head", 0.67, 1.0, 20.0), row("group", 0.67, 1.2, 15.0)]
    line = speed_script.trade_off(rows, 64)
    assert "at 0.33, head keeps the lowest perplexity (10.00, 1.00x) and group decodes fastest (1.10x" in line
    assert "at 0.67, group keeps the lowest perplexity (15.00, 1.20x)." in line
    assert line.endswith("Not beaten on both by another configuration: head@0.33, group@0.33, group@0.67.")


def test_multiply_adds_of_the_quick_model(speed_script):
    model = speed_script.quick_model(None)  # 3 layers, hidden 144, 9 query heads and 3 key/value heads of 16, MLP 288
    batch, length = 2, 10
    tokens, pairs = batch * length, batch * (length * (length + 1) // 2)
    per_token = 3 * (144 * 144 + 2 * 144 * 48 + 144 * 144 + 3 * 144 * 288) + 144 * VOCAB
    assert speed_script.multiply_adds(model, batch, length) == tokens * per_token + 3 * 2 * 9 * 16 * pairs

    # Compacted: layer 0 keeps 6 heads in 2 groups, layer 1 keeps 8 heads of 3 groups (unequal), layer 2 none.
    gated = copy.deepcopy(model)
    gates = attach_gates(gated)
    gates.prune([(0, head) for head in range(3)] + [(1, 4)] + [(2, head) for head in range(9)])
    compacted = compact(gated)
    assert speed_script.per_layer_heads(compacted) == [(6, 2), (8, 3), (0, 0)]
    attention = [2 * 144 * 96 + 2 * 144 * 32, 2 * 144 * 128 + 2 * 144 * 48, 0]
    per_token = sum(attention) + 3 * 3 * 144 * 288 + 144 * VOCAB
    assert speed_script.query_slots_per_layer(compacted) == [6, 9, 0]  # layer 1: groups of 3, 2, 3 in 3 x 3 slots
    scores = 2 * (6 + 9) * 16 * pairs
    assert speed_script.multiply_adds(compacted, batch, length) == tokens * per_token + scores
    assert speed_script.sizes(compacted, speed_script.parse_args(["--quick"]))["stock_modules"] is False
    assert torch.equal(gates.active.sum(dim=1), torch.tensor([6, 8, 0]))


def test_model_dir_measures_a_saved_folder_against_the_plain_model(speed_script, tmp_path):
    from sentinel_lightning.saving import save_pruned

    gated = speed_script.quick_model(None)
    attach_gates(gated).prune([(0, 0), (0, 1), (0, 2), (1, 4), (2, 8)])  # a whole group, then unequal groups
    save_pruned(gated, str(tmp_path / "pruned"))
    arguments = ["--quick", "--threads", "1", "--rounds", "1", "--model_dir", str(tmp_path / "pruned"),
                 "--output_dir", str(tmp_path / "out")]

    results = speed_script.main(arguments)

    saved, = results["configurations"]
    assert saved["name"] == "saved" and saved["scope"] == "per-layer" and not saved["equal_groups"]
    assert saved["sparsity"] == pytest.approx(5 / 27) and saved["perplexity_gated"] is None
    assert saved["key_value_heads_per_layer"] == [2, 3, 3]
    check_sizes(saved, results["plain"], results["settings"]["decode_contexts"])
    assert "| saved | per-layer |" in (tmp_path / "out" / "speed.md").read_text()
    with pytest.raises(SystemExit):
        speed_script.parse_args(["--quick", "--model_dir", str(tmp_path)])  # no config.json there
