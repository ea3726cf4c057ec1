"""HeadPruning(fade_steps=n): pruned heads fade out over n optimizer steps (HeadGates.fading)."""

import lightning as L
import pytest
import torch
from conftest import tiny_data, tiny_model, tiny_trainer
from test_linear_compensation import fit_every_pruned_layer, projection_inputs

from sentinel_lightning import GatedLanguageModel, HeadMetrics, HeadPruning
from sentinel_lightning.compaction import compact
from sentinel_lightning.gates import attach_gates


@pytest.mark.parametrize("linear", [False, True])
def test_a_fading_head_writes_its_share_of_its_output_and_the_rest_of_its_replacement(tokens, linear):
    model = tiny_model("llama")
    gates = attach_gates(model)
    with torch.no_grad():
        gates.values[0].copy_(torch.tensor([0.5, 1.5, 0.8, 1.2]))
    kept = projection_inputs(model, tokens, 0)  # [positions, H * D]: every head kept
    gates.prune([(0, 1), (0, 2)])
    gates.compensation[0, 1:3] = torch.randn(2, gates.head_dim)
    if linear:
        fit_every_pruned_layer(model, tokens)
    pruned = projection_inputs(model, tokens, 0)
    gates.fading[0, 1], gates.fading[0, 2] = 0.25, 1.0
    share = torch.tensor([0.25, 1.0]).repeat_interleave(gates.head_dim)  # [2 * D]: of heads 1 and 2
    columns = torch.arange(gates.head_dim, 3 * gates.head_dim)
    expected = pruned.clone()  # the kept heads write what they wrote, and the prediction reads only them
    expected[:, columns] = share * kept[:, columns] + (1 - share) * pruned[:, columns]
    assert torch.allclose(projection_inputs(model, tokens, 0), expected, atol=1e-5)
    assert not torch.allclose(expected, pruned, atol=1e-3)


def test_a_fading_head_gets_no_gate_gradient_and_reactivation_ends_its_fading(tokens):
    model = tiny_model("llama")
    gates = attach_gates(model)
    plain = model(tokens).logits
    gates.prune([(1, 3)])
    gates.fading[1, 3] = 0.5
    model(tokens).logits.sum().backward()
    assert gates.values.grad[1, 3] == 0.0 and (gates.values.grad[gates.active] != 0).all()
    gates.reactivate([(1, 3)])
    assert gates.fading[1, 3] == 0.0
    assert torch.allclose(model(tokens).logits, plain, atol=1e-5)


class FadingEveryStep(L.Callback):
    """Records, at every training batch, the step it trains and the largest fading share (after HeadPruning's
    update: it comes after it in the callbacks)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step + 1, round(pl_module.gates.fading.max().item(), 4)))


def faded_fit(max_epochs, ckpt_path=None, checkpoint_dir=None):
    L.seed_everything(0)
    module = GatedLanguageModel(tiny_model("llama"), learning_rate=1e-3)
    pruning = HeadPruning("ablation", schedule={0: 0.5}, unit="group", scope="uniform", compensate="linear",
                          fade_steps=3)
    probe = FadingEveryStep()
    callbacks = [HeadMetrics(), pruning, probe]
    if checkpoint_dir is not None:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(checkpoint_dir, save_top_k=-1, every_n_epochs=1))
    trainer = tiny_trainer(max_epochs=max_epochs, limit_train_batches=2, callbacks=callbacks,
                           enable_checkpointing=checkpoint_dir is not None)
    trainer.fit(module, tiny_data(), ckpt_path=ckpt_path)
    return module, probe


def test_pruned_heads_fade_out_over_the_steps_after_the_pruning_and_resume_where_they_were(tmp_path):
    """Pruned after step 2, the heads write 2/3, then 1/3, then none of their output; a run resumed from the end
    of epoch 1 (1/3 left) goes on from there and ends with the same model."""
    module, probe = faded_fit(4, checkpoint_dir=tmp_path)
    assert probe.seen == [(1, 0.0), (2, 0.0), (3, 0.6667), (4, 0.3333), (5, 0.0), (6, 0.0), (7, 0.0), (8, 0.0)]
    assert module.gates.num_active == 4 and not module.gates.fading.any()
    compacted = compact(module)
    assert compacted.config.num_attention_heads == 2

    resumed, probe = faded_fit(4, ckpt_path=str(tmp_path / "epoch=1-step=4.ckpt"))
    assert probe.seen == [(5, 0.0), (6, 0.0), (7, 0.0), (8, 0.0)]
    resumed_at_epoch_0, probe = faded_fit(4, ckpt_path=str(tmp_path / "epoch=0-step=2.ckpt"))
    assert probe.seen[:3] == [(3, 0.6667), (4, 0.3333), (5, 0.0)]
    for other in (resumed, resumed_at_epoch_0):
        torch.testing.assert_close(other.state_dict(), module.state_dict(), rtol=0, atol=0, equal_nan=True)


def test_a_model_still_fading_is_not_compacted_and_the_run_says_so():
    with pytest.warns(UserWarning, match=r"4 pruned head\(s\) still fading out \(fade_steps=3\)"):
        module, probe = faded_fit(2)
    assert probe.seen[-1] == (4, 0.3333)
    with pytest.raises(ValueError, match=r"4 pruned head\(s\) still write part of their output while they fade out"):
        compact(module)
    module.gates.fading.zero_()
    assert compact(module).config.num_attention_heads == 2


@pytest.mark.parametrize("fade_steps", [-1, 1.5, True, "3"])
def test_fade_steps_must_be_a_non_negative_integer(fade_steps):
    with pytest.raises(ValueError, match=rf"fade_steps={fade_steps!r} must be a non-negative integer"):
        HeadPruning(fade_steps=fade_steps)
