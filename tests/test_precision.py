"""``--trainer.precision bf16-mixed`` on CPU: the head statistics are summed in fp32 and kept in fp64 whatever the
model computes in, a tiny fine-tune takes the same pruning decision as in float32, and
``scripts/benchmark_precision.py`` times both precisions side by side."""

import json
import statistics

import lightning as L
import torch
from conftest import tiny_data, tiny_model, tiny_trainer
from scripts_loader import load_script

from sentinel_lightning import GatedLanguageModel, HeadMetrics, HeadPruning
from sentinel_lightning.gates import attach_gates
from sentinel_lightning.measure.attention_entropy import EntropyRecording
from sentinel_lightning.measure.head_outputs import HeadOutputRecording
from sentinel_lightning.standalone.families import output_projections


def test_recordings_sum_in_fp32_under_bf16_autocast(tokens):
    model = tiny_model("llama", width=64)
    attach_gates(model)
    inputs = {}
    for layer, projection in enumerate(output_projections(model)):  # what each output projection receives
        projection.register_forward_pre_hook(lambda module, args, layer=layer: inputs.__setitem__(layer, args[0]))
    recordings = HeadOutputRecording(model, products=True), EntropyRecording(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), recordings[0] as outputs, recordings[1] as entropy:
        model(input_ids=tokens)
    assert inputs[0].dtype == torch.bfloat16  # the model did compute in bf16
    for layer, hidden in inputs.items():
        flat = hidden.double().flatten(0, 1)  # [B * T, H * D]: the bf16 values, exactly
        expected = flat.T @ flat
        error = (outputs.output_products[layer].double() - expected).abs().max() / expected.abs().max()
        assert error < 1e-5  # a bf16 product would be off by ~1e-3
        assert outputs.output_products.dtype == outputs.output_sums.dtype == torch.float32
    assert all(total.dtype == torch.float32 for total in entropy.totals.values())


def fit(precision: str):
    L.seed_everything(0)
    module = GatedLanguageModel(model=tiny_model("llama"), learning_rate=1e-3)
    metrics = HeadMetrics(reset_on_prune=False)
    pruning = HeadPruning("gradient_compensated", {0: 0.25}, compensate="linear")
    trainer = tiny_trainer(max_epochs=1, precision=precision, callbacks=[metrics, pruning])
    trainer.fit(module, tiny_data(block_size=32, batch_size=2))
    return module, metrics, pruning


def test_bf16_mixed_keeps_fp64_statistics_and_takes_the_float32_decision():
    _, metrics32, pruning32 = fit("32-true")
    module16, metrics16, pruning16 = fit("bf16-mixed")
    for key in metrics16.statistics.keys:
        assert getattr(metrics16.statistics, key).total.dtype == torch.float64
    assert module16.gates.values.dtype == module16.gates.reconstruction.dtype == torch.float32
    assert pruning16.events[0].heads == pruning32.events[0].heads
    computed32, computed16 = metrics32.compute(), metrics16.compute()
    for key, value in computed32.items():  # the same statistics up to the model's bf16 arithmetic
        assert (computed16[key] - value).abs().max() <= 0.05 * value.abs().max()


def test_the_ablation_measures_in_the_precision_the_model_trains_in(monkeypatch):
    """Under bf16-mixed the ablation's forwards run under the trainer's autocast, as its training steps do."""
    import sentinel_lightning.measure.ablation as ablation

    seen = []
    measure = ablation.causal_lm_nll

    def spy(model, batch):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return measure(model, batch)

    monkeypatch.setattr(ablation, "causal_lm_nll", spy)
    for precision, expected in (("bf16-mixed", True), ("32-true", False)):
        seen.clear()
        L.seed_everything(0)
        module = GatedLanguageModel(tiny_model("llama"), learning_rate=1e-3)
        pruning = HeadPruning("ablation", schedule={0: 0.25}, compensate="mean")
        tiny_trainer(max_epochs=1, precision=precision, callbacks=[HeadMetrics(), pruning]).fit(module, tiny_data())
        assert len(seen) == 9 and set(seen) == {expected}  # the model as it is, then each of its 8 heads
        assert module.gates.num_active == 6


def test_the_precision_benchmark_times_both_precisions_side_by_side(tmp_path):
    script = load_script("benchmark_precision")
    result = script.main(["--quick", "--rounds", "2", "--output-dir", str(tmp_path)])
    assert json.loads((tmp_path / "precision.json").read_text()) == result
    assert all(len(times) == 2 for times in (*result["step_seconds"].values(), *result["forward_seconds"].values()))
    # Each precision really computed as named: bf16 logits under autocast, float32 ones without.
    assert result["logits_dtype"] == {"32-true": "torch.float32", "bf16-mixed": "torch.bfloat16"}
    float32, bf16 = result["step_seconds"]["32-true"], result["step_seconds"]["bf16-mixed"]
    assert result["step_bf16_speedup"] == statistics.median(a / b for a, b in zip(float32, bf16))
    assert result["job_precision"] == ("bf16-mixed" if result["native_bf16"] else "32-true")
    assert "| tiny llama | 2 x 32 | training step |" in (tmp_path / "precision.md").read_text()
