import math

import lightning as L
import pytest
import torch
from conftest import tiny_data, tiny_model, tiny_trainer
from torch.utils.data import DataLoader

from sentinel_lightning import GatedLanguageModel
from sentinel_lightning.losses import causal_lm_token_losses


def test_training_lowers_the_loss():
    L.seed_everything(0)
    module = GatedLanguageModel(tiny_model("llama"), learning_rate=3e-3, warmup_ratio=0.0)
    data = tiny_data()
    trainer = tiny_trainer(max_epochs=1, limit_train_batches=40, limit_val_batches=4)
    before = trainer.validate(module, data, verbose=False)[0]["val_loss"]
    trainer.fit(module, data)
    after = trainer.validate(module, data, verbose=False)[0]["val_loss"]
    assert after < before - 0.5


def test_val_ppl_is_token_weighted_and_excludes_padding():
    module = GatedLanguageModel(tiny_model("gpt2")).eval()
    torch.manual_seed(0)
    batches = []
    for length in (10, 4):  # two batches of very different numbers of predicted tokens
        ids = torch.randint(3, 200, (2, 12))
        labels = ids.clone()
        labels[:, length:] = -100
        batches.append({"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels})
    trainer = tiny_trainer()
    metrics = trainer.validate(module, DataLoader(batches, batch_size=None), verbose=False)[0]
    total, tokens = 0.0, 0
    for batch in batches:
        logits = module(batch["input_ids"], batch["attention_mask"])
        for b in range(2):
            for t in range(11):
                if batch["labels"][b, t + 1] != -100:
                    total -= torch.log_softmax(logits[b, t], -1)[batch["labels"][b, t + 1]].item()
                    tokens += 1
    assert tokens == 2 * 9 + 2 * 3
    assert metrics["val_ppl"] == pytest.approx(math.exp(total / tokens), rel=1e-4)
    assert metrics["val_loss"] == pytest.approx(total / tokens, rel=1e-4)


def test_gate_learning_flag_and_learning_rates():
    for learn in (True, False):
        module = GatedLanguageModel(tiny_model("qwen2"), learn_gates=learn, learning_rate=1e-4, gate_learning_rate=0.5)
        trainer = tiny_trainer(max_steps=3, limit_val_batches=0)
        trainer.fit(module, tiny_data())
        optimizer = trainer.optimizers[0]
        gate_groups = [g for g in optimizer.param_groups if any(p is module.gates.values for p in g["params"])]
        assert len(gate_groups) == (1 if learn else 0)
        assert module.gates.values.requires_grad == learn
        assert torch.any(module.gates.values != 1.0) == learn
        if learn:
            assert gate_groups[0]["initial_lr"] == 0.5 and gate_groups[0]["weight_decay"] == 0.0


def test_checkpoint_rebuilds_a_module_built_from_a_model_object(tmp_path):
    module = GatedLanguageModel(tiny_model("gpt_neox"), learning_rate=2e-4)
    module.gates.prune([(0, 1)])
    trainer = tiny_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(module, tiny_data())
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    restored = GatedLanguageModel.load_from_checkpoint(path)
    assert restored.hparams.learning_rate == 2e-4 and restored.hparams.model_config["model_type"] == "gpt_neox"
    assert torch.equal(restored.gates.active, module.gates.active)
    ids = torch.randint(3, 200, (1, 8))
    assert torch.allclose(restored.eval()(ids), module.eval()(ids), atol=1e-6)


def test_loss_helper_counts_only_labelled_tokens():
    logits = torch.zeros(1, 4, 5)
    labels = torch.tensor([[1, 2, -100, 3]])
    total, tokens = causal_lm_token_losses(logits, labels)
    assert tokens == 2 and total.item() == pytest.approx(2 * math.log(5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"learning_rate": 0.0}, "learning_rate=0.0"),
        ({"gate_learning_rate": -1.0}, "gate_learning_rate=-1.0"),
        ({"warmup_ratio": 1.0}, r"warmup_ratio=1.0 must lie in \[0, 1\)"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GatedLanguageModel(tiny_model("llama"), **kwargs)


def test_unloadable_model_says_what_failed(tmp_path):
    with pytest.raises(RuntimeError, match=r"Could not load model='.*nowhere'"):
        GatedLanguageModel(str(tmp_path / "nowhere"))
