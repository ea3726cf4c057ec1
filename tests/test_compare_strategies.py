import json

import pytest
import torch
from scripts_loader import SCRIPTS, load_script


def identical(first: torch.Tensor, second: torch.Tensor) -> bool:
    """``torch.equal`` where NaN equals NaN (gates keep NaN for "no importance recorded")."""
    return first.shape == second.shape and bool(((first == second) | (first.isnan() & second.isnan())).all())


def test_quick_comparison_writes_every_strategy_and_level(tmp_path):
    script = load_script("compare_strategies")
    output = tmp_path / "out"
    results = script.main(["--quick", "--strategies", "entropy", "gradient", "random", "--output-dir", str(output)])

    assert (output / "pruning_strategy_comparison.png").stat().st_size > 10_000
    with open(output / "results.json") as file:
        saved = json.load(file)
    assert saved["levels"] == [0.0, 0.25, 0.5] and saved["seeds"] == [0, 1]
    runs = {(row["strategy"], row["seed"], row["level"]) for row in saved["results"]}
    expected = {(name, None, level) for name in ("entropy", "gradient") for level in (0.0, 0.25, 0.5)}
    expected |= {("random", seed, level) for seed in (0, 1) for level in (0.0, 0.25, 0.5)}
    assert runs == expected
    for row in saved["results"]:
        assert row["heads_pruned"] == round(row["level"] * 8) == len(row["pruned"])
        assert row["perplexity"] > 1 and row["tokens_per_second"] > 0
        assert 0 <= row["lexical_diversity"] <= 1 and 0 <= row["repetition_score"] <= 1
    # Unpruned, every strategy is the same model.
    dense = {row["perplexity"] for row in saved["results"] if row["level"] == 0.0}
    assert len(dense) == 1
    assert results["results"] == saved["results"]

    report = (output / "results.md").read_text()
    for text in ("entropy", "gradient", "random (median [min, max], 2 seeds)", "| 0% |", "| 25% |", "| 50% |",
                 "Validation perplexity", "tokens per second", "--quick"):
        assert text in report


def test_recovery_steps_fine_tune_a_copy_with_frozen_gates(tmp_path):
    script = load_script("compare_strategies")
    output = tmp_path / "recovered"
    results = script.main([
        "--quick", "--recovery-steps", "2", "--levels", "0.0", "0.5", "--strategies", "gradient", "random",
        "--seeds", "0", "--output-dir", str(output),
    ])
    assert {(row["strategy"], row["level"]) for row in results["results"]} == {
        ("gradient", 0.0), ("gradient", 0.5), ("random", 0.0), ("random", 0.5)
    }
    assert results["recovery_steps"] == 2 and "2 recovery fine-tuning steps" in (output / "results.md").read_text()

    model, _, data = script.load(script.parse_args(["--quick"]))
    model.head_gates.prune([(0, 1), (1, 2)])
    before = {name: value.clone() for name, value in model.state_dict().items()}
    recovered = script.recover(model, data, steps=2, learning_rate=1e-2)
    after = model.state_dict()
    assert all(identical(before[name], after[name]) for name in before)  # the original is untouched
    changed = [name for name, value in recovered.state_dict().items() if not identical(value, before[name])]
    assert changed and not any("head_gates" in name for name in changed)  # weights trained, gates frozen
    assert recovered.head_gates.pruned_heads() == [(0, 1), (1, 2)]


def test_bad_arguments_name_the_option(capsys):
    script = load_script("compare_strategies")
    with pytest.raises(SystemExit):
        script.parse_args(["--levels", "1.5"])
    assert "--levels contains 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--recovery-steps", "-1"])
    assert "--recovery-steps=-1" in capsys.readouterr().err


def test_the_script_is_thin_over_the_package():
    script = load_script("compare_strategies")
    source = (SCRIPTS / "compare_strategies.py").read_text()
    assert not hasattr(script, "tiny_llama") and "LlamaConfig" not in source  # the package's tiny model
    assert "causal_lm_token_losses" not in source and "log_softmax" not in source  # no evaluation of its own
    # Gates change only through gates.prune and gates.reactivate.
    assert ".active[" not in source and ".values.data" not in source and "fill_(" not in source
    model, _, _ = script.load(script.parse_args(["--quick"]))
    from sentinel_lightning.tiny import tiny_model

    reference = tiny_model("llama", seed=0)
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in reference.state_dict().items())


def test_compensated_runs_prune_the_same_heads_and_write_their_mean_outputs(tmp_path):
    results = load_script("compare_strategies").main([
        "--quick", "--strategies", "gradient", "attention_sink", "--compensate", "gradient", "--compensate-linear",
        "gradient", "--seeds", "0", "--output-dir", str(tmp_path),
    ])
    assert results["strategies"] == ["gradient", "attention_sink", "gradient+compensation", "gradient+linear"]
    by_run = {(row["strategy"], row["level"]): row for row in results["results"]}
    for level in (0.25, 0.5):
        plain, compensated = by_run[("gradient", level)], by_run[("gradient+compensation", level)]
        linear = by_run[("gradient+linear", level)]
        assert plain["pruned"] == compensated["pruned"] == linear["pruned"]
        assert len({plain["perplexity"], compensated["perplexity"], linear["perplexity"]}) == 3
    assert by_run[("gradient", 0.0)]["perplexity"] == by_run[("gradient+compensation", 0.0)]["perplexity"]
    assert "gradient+compensation" in (tmp_path / "results.md").read_text()


def test_ablation_is_compared_when_asked_for(tmp_path):
    script = load_script("compare_strategies")
    assert "ablation" not in script.parse_args(["--quick"]).strategies  # one forward per head: not by default
    results = script.main(["--quick", "--strategies", "ablation", "gradient", "--levels", "0.0", "0.5",
                           "--output-dir", str(tmp_path)])
    ablation = torch.tensor(results["head_metrics"]["ablation"])  # [L, H]: each head's measured loss increase
    assert ablation.shape == (2, 4) and torch.isfinite(ablation).all()
    (pruned,) = [row["pruned"] for row in results["results"] if row["strategy"] == "ablation" and row["level"] == 0.5]
    cheapest = sorted(range(8), key=lambda index: ablation.flatten()[index].item())[:4]
    assert sorted(layer * 4 + head for layer, head in pruned) == sorted(cheapest)


def test_groups_are_compared_in_the_uniform_shape(tmp_path):
    results = load_script("compare_strategies").main([
        "--quick", "--strategies", "ablation", "gradient", "--levels", "0.0", "0.5", "--unit", "group",
        "--scope", "uniform", "--output-dir", str(tmp_path)])
    for row in results["results"]:
        if row["level"] == 0.5:  # the tiny Llama's 2 layers x 4 heads in 2 groups: one group of every layer
            assert sorted({(layer, head // 2) for layer, head in row["pruned"]}) in (
                [(0, g0), (1, g1)] for g0 in (0, 1) for g1 in (0, 1))
            assert len(row["pruned"]) == 4
    assert "unit group, uniform scope" in (tmp_path / "results.md").read_text()
