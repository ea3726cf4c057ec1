"""``memory.head_state_bytes`` from a config alone equals what a tiny model's fine-tune-with-pruning run holds, and
the large statistics are computed only where a decision needs them."""

import lightning as L
import pytest
import torch
from conftest import tiny_config, tiny_data, tiny_model, tiny_trainer
from lightning.pytorch.loggers import TensorBoardLogger

from sentinel_lightning import GatedLanguageModel, GateMonitor, HeadMetrics, HeadPruning
from sentinel_lightning.gates import attach_gates
from sentinel_lightning.measure.attention_entropy import EntropyRecording
from sentinel_lightning.memory import head_state_bytes, model_bytes
from sentinel_lightning.metrics import PerHeadMean

LORA = {"r": 4, "target_modules": ["q_proj", "v_proj", "o_proj"]}
BATCH, BLOCK = 2, 32


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a broadcast default counts its one element)."""
    storages = {}
    for tensor in tensors:
        if tensor is not None:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def metric_tensors(metric: PerHeadMean):
    return [getattr(metric, name) for name in metric._defaults] + list(metric._defaults.values())


class Probe(L.Callback):
    """Measures, inside the run, what the gates, the head metrics and the teacher hold."""

    def __init__(self, metrics: HeadMetrics):
        self.metrics = metrics
        self.measured = {}

    def on_before_backward(self, trainer, pl_module, loss):
        kept = self.metrics._outputs._outputs.values()  # [B, T, H, D] views kept from forward to backward
        self.measured["step_head_outputs"] = sum(o.numel() * o.element_size() for o in kept)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        gates, recording = pl_module.gates, self.metrics._outputs
        moments = [t for t in optimizer.state.get(gates.values, {}).values() if t.shape == gates.values.shape]
        self.measured["gate_gradient_and_optimizer"] = storage_bytes([gates.values.grad, *moments])
        self.measured["step_recording"] = storage_bytes([
            recording.output_sums, recording.prior_sums, recording.example_importance, recording.example_gradient,
            recording.compensated_importance, recording.output_products,
        ])

    def on_train_end(self, trainer, pl_module):
        gates, statistics = pl_module.gates, self.metrics.statistics
        self.measured["gates"] = storage_bytes(
            [gates.values, *(buffer for name, buffer in gates.named_buffers() if name != "reconstruction")]
        )
        self.measured["reconstruction"] = storage_bytes([gates.reconstruction])
        small = [getattr(statistics, key) for key in statistics.KEYS]
        self.measured["statistics"] = storage_bytes([t for metric in small for t in metric_tensors(metric)])
        moment = statistics.output_second_moment
        self.measured["second_moment"] = 0 if moment is None else storage_bytes(metric_tensors(moment))
        teacher = pl_module.teacher
        self.measured["teacher"] = 0 if teacher is None else storage_bytes(
            [*teacher.parameters(), *(b for n, b in teacher.named_buffers() if "head_gates" in n)]
        )


def run(compensate="linear", distillation_teacher=None, lora=None):
    L.seed_everything(0)
    distillation = 0.0 if distillation_teacher is None else 0.5
    module = GatedLanguageModel(
        model=tiny_model("llama"), learning_rate=1e-3, lora=lora, distillation=distillation,
        distillation_teacher=distillation_teacher or "loaded",
    )
    metrics = HeadMetrics(entropy_every_n_steps=4)
    probe = Probe(metrics)
    pruning = HeadPruning("gradient", {0: 0.25, 1: 0.5}, compensate=compensate)  # the second copies a teacher with
    # the first event's reconstruction, the most a "before_pruning" teacher holds
    trainer = tiny_trainer(max_epochs=2, callbacks=[metrics, pruning, probe])
    trainer.fit(module, tiny_data(block_size=BLOCK, batch_size=BATCH))
    return probe.measured


@pytest.mark.parametrize(
    "setting",
    [
        {"compensate": "linear"},
        {"compensate": "mean", "distillation_teacher": "loaded"},
        {"compensate": "linear", "distillation_teacher": "before_pruning", "lora": LORA},
    ],
    ids=["job-default", "mean-loaded-teacher", "lora-teacher-before-pruning"],
)
def test_the_memory_model_equals_what_a_tiny_run_allocates(setting):
    measured = run(**setting)
    predicted = head_state_bytes(tiny_config("llama"), batch_size=BATCH, sequence_length=BLOCK, **setting)
    assert {key: predicted[key] for key in measured} == measured
    assert (predicted["second_moment"] > 0) == (setting["compensate"] == "linear")


def test_the_memory_model_needs_no_weights_and_checks_its_arguments():
    config = tiny_config("llama", num_layers=3, num_heads=8, num_kv_heads=2, width=64)
    linear, none = head_state_bytes(config), head_state_bytes(config, compensate="none")
    assert linear["second_moment"] == 3 * 64 * 64 * 8 + 40 and none["second_moment"] == none["reconstruction"] == 0
    weights = sum(p.numel() * 4 for p in tiny_model("llama", num_layers=3, num_heads=8, num_kv_heads=2, width=64)
                  .parameters())
    assert model_bytes(config)["weights"] == weights
    assert model_bytes(config, lora=LORA)["trainable_with_adamw"] < model_bytes(config)["trainable_with_adamw"]
    with pytest.raises(ValueError, match="compensate="):
        head_state_bytes(config, compensate="quadratic")
    with pytest.raises(ValueError, match="distillation_teacher="):
        head_state_bytes(config, distillation_teacher="dense")


def test_gate_monitor_and_pruning_never_compute_the_whole_second_moment(tmp_path, monkeypatch):
    computed = []
    original = PerHeadMean.compute

    def compute(self):
        computed.append(self.name)
        return original(self)

    monkeypatch.setattr(PerHeadMean, "compute", compute)
    L.seed_everything(0)
    module = GatedLanguageModel(model=tiny_model("llama"), learning_rate=1e-3)
    metrics = HeadMetrics(reset_on_prune=False)
    monitor = GateMonitor(log_every_n_steps=1)
    pruning = HeadPruning("gradient", {0: 0.25}, compensate="linear")
    trainer = tiny_trainer(max_epochs=1, callbacks=[metrics, pruning, monitor], logger=TensorBoardLogger(tmp_path))
    trainer.fit(module, tiny_data(block_size=BLOCK, batch_size=BATCH))
    assert module.gates.reconstruction.any()  # the event did fit the linear compensation
    assert "output_second_moment" not in computed and {"entropy", "grad_norm"} <= set(computed)
    with pytest.raises(ValueError, match="keys="):
        metrics.compute(["entropy", "curvature"])
    layer = metrics.output_second_moment([1])[1]
    assert torch.isfinite(layer).all() and torch.equal(layer, metrics.compute()["output_second_moment"][1])


def test_the_entropy_step_keeps_no_attention_probabilities_for_backward():
    model = tiny_model("llama")
    gates = attach_gates(model)
    tokens = torch.randint(0, 256, (2, 16))
    saved = []
    with EntropyRecording(model) as recording, torch.autograd.graph.saved_tensors_hooks(
        lambda tensor: saved.append(tuple(tensor.shape)) or tensor, lambda tensor: tensor
    ):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    assert recording.complete and gates.values.grad.abs().sum() > 0
    per_head = [shape for shape in saved if len(shape) == 4 and shape[1] == 4 and shape[-2:] == (16, 16)]
    assert saved and not per_head  # no [B, H, T, T] (the model's one [B, 1, T, T] mask is shared by the layers)
    plain = tiny_model("llama")
    attach_gates(plain)
    plain.config._attn_implementation = "eager"
    plain(input_ids=tokens, labels=tokens).loss.backward()
    torch.testing.assert_close(gates.values.grad, plain.head_gates.values.grad)
