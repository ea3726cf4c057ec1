"""Distillation from the dense model: ``GatedLanguageModel(distillation=..., distillation_temperature=...)``."""

import math
import warnings

import lightning as L
import pytest
import torch
import yaml
from conftest import tiny_data, tiny_model, tiny_trainer

from sentinel_lightning import GatedLanguageModel, HeadPruning
from sentinel_lightning.cli import main
from sentinel_lightning.events import HeadEvent, notify_head_event
from sentinel_lightning.gates import find_gates
from sentinel_lightning.losses import causal_lm_nll


def step_loss(module, batch):
    """``training_step`` outside a Trainer (``self.log`` then only warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module.training_step(batch, 0)


def perturbed(module, scale=0.05, seed=1):
    """``module`` with its student's weights moved off the teacher's (a stand-in for fine-tuning)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return module


def test_no_distillation_is_exactly_the_plain_loss():
    module = GatedLanguageModel(tiny_model("llama"))
    assert module.teacher is None and module.hparams.distillation == 0.0
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(3, 200, (2, 12))}
    nll_sum, tokens = causal_lm_nll(module.model, batch)
    assert torch.equal(step_loss(module, batch), nll_sum / tokens)


def test_an_unpruned_student_equal_to_its_teacher_has_no_kl():
    module = GatedLanguageModel(tiny_model("llama"), distillation=1.0, distillation_temperature=3.0)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(3, 200, (2, 12))}
    assert step_loss(module, batch).abs().item() < 1e-6
    module.gates.prune([(0, 1), (1, 2)])  # the pruned student moves away from the dense teacher
    assert step_loss(module, batch).item() > 1e-4


def reference_loss(module, rows, weight, temperature):
    """The mixed loss by explicit loops over each row's real tokens (``rows``: 1-D tensors of token ids)."""
    ce = kl = 0.0
    tokens = 0
    for row in rows:
        student = module.model(input_ids=row[None]).logits[0].double()
        teacher = module.teacher(input_ids=row[None]).logits[0].double()
        for t in range(len(row) - 1):
            ce -= torch.log_softmax(student[t], -1)[row[t + 1]].item()
            p_teacher = torch.softmax(teacher[t] / temperature, -1)
            log_teacher = torch.log_softmax(teacher[t] / temperature, -1)
            log_ratio = log_teacher - torch.log_softmax(student[t] / temperature, -1)
            kl += (p_teacher * log_ratio).sum().item()
            tokens += 1
    return (1 - weight) * ce / tokens + weight * temperature**2 * kl / tokens


def test_kl_and_ce_share_the_mask_padding_and_ignored_labels_count_for_nothing():
    module = perturbed(GatedLanguageModel(tiny_model("llama"), distillation=0.5, distillation_temperature=2.0))
    module.gates.prune([(0, 3)])
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (2, 12))
    lengths = (9, 5)
    attention_mask = torch.zeros(2, 12, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    rows = [ids[row, :length] for row, length in enumerate(lengths)]
    expected = reference_loss(module, rows, 0.5, 2.0)
    padded = step_loss(module, {"input_ids": ids, "attention_mask": attention_mask})
    assert padded.item() == pytest.approx(expected, rel=1e-5)
    labels = ids.masked_fill(attention_mask == 0, -100)  # the same positions ignored through labels instead
    assert step_loss(module, {"input_ids": ids, "labels": labels}).item() == pytest.approx(expected, rel=1e-5)
    # Token-weighted: the padded batch is the two rows cut to their real tokens, weighted by their predictions.
    cut = [step_loss(module, {"input_ids": row[None]}).item() for row in rows]
    weights = [length - 1 for length in lengths]
    assert padded.item() == pytest.approx(sum(w * c for w, c in zip(weights, cut)) / sum(weights), rel=1e-5)


class LoggedMetrics(L.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train_")})


def test_the_teacher_stays_frozen_outside_state_dict_and_optimizer():
    L.seed_everything(0)
    module = GatedLanguageModel(tiny_model("qwen2"), distillation=0.5, learning_rate=1e-2, warmup_ratio=0.0)
    teacher = module.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in module.model.state_dict().items()}
    logged = LoggedMetrics()
    trainer = tiny_trainer(max_steps=3, limit_val_batches=0, callbacks=[logged])
    trainer.fit(module, tiny_data())
    assert module.teacher is teacher and not teacher.training and not hasattr(teacher, "head_gates")
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(v, student_before[k]) for k, v in module.model.state_dict().items())
    teacher_ids = {id(p) for p in teacher.parameters()}
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized and not optimized & teacher_ids
    state_dict = module.state_dict()
    assert not any("teacher" in key for key in state_dict)
    assert set(state_dict) == set(GatedLanguageModel(tiny_model("qwen2")).state_dict())
    assert not any(p is q for p in module.parameters() for q in teacher.parameters())
    assert len(logged.steps) == 3
    for metrics in logged.steps:
        expected = 0.5 * metrics["train_ce"] + 0.5 * 2.0**2 * metrics["train_kl"]
        assert metrics["train_loss"] == pytest.approx(expected, rel=1e-5)
    assert logged.steps[0]["train_kl"] == pytest.approx(0.0, abs=1e-6) and logged.steps[-1]["train_kl"] > 0


def test_a_checkpoint_round_trip_rebuilds_the_teacher_from_its_source(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    module = GatedLanguageModel(str(tmp_path / "tiny"), distillation=0.3, distillation_temperature=1.5)
    trainer = tiny_trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, tiny_data())
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    saved = torch.load(tmp_path / "run.ckpt", weights_only=False)["state_dict"]
    assert not any("teacher" in key for key in saved)
    restored = GatedLanguageModel.load_from_checkpoint(tmp_path / "run.ckpt")
    assert restored.hparams.distillation == 0.3 and restored.hparams.distillation_temperature == 1.5
    assert restored.teacher is not None and restored.teacher is not module.teacher
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(restored.teacher.state_dict()[key], value)
    assert torch.equal(restored.model.model.embed_tokens.weight, module.model.model.embed_tokens.weight)
    assert not torch.equal(restored.model.model.embed_tokens.weight, restored.teacher.model.embed_tokens.weight)
    tiny_trainer(max_steps=1, limit_val_batches=0).fit(restored, tiny_data())  # and it trains on


def test_a_module_built_from_a_model_object_needs_the_dense_model_again_to_distil(tmp_path):
    module = GatedLanguageModel(tiny_model("gpt_neox"), distillation=0.5)
    trainer = tiny_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, tiny_data())
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    restored = GatedLanguageModel.load_from_checkpoint(tmp_path / "run.ckpt")  # from model_config: random weights
    assert restored.teacher is None
    with pytest.raises(ValueError, match=r"distillation=0.5 needs the dense model as loaded.*model=<the model"):
        tiny_trainer(max_steps=1, limit_val_batches=0).fit(restored, tiny_data())
    again = GatedLanguageModel.load_from_checkpoint(tmp_path / "run.ckpt", model=tiny_model("gpt_neox"))
    dense = tiny_model("gpt_neox")
    assert all(torch.equal(again.teacher.state_dict()[k], v) for k, v in dense.state_dict().items())
    assert torch.equal(again.gates.values, module.gates.values)


def test_a_gated_model_object_gives_its_dense_self_as_teacher():
    model = tiny_model("llama")
    first = GatedLanguageModel(model)
    first.gates.prune([(0, 0), (1, 1)])
    module = GatedLanguageModel(model, distillation=1.0)  # the same, already gated object
    assert module.gates is first.gates and not hasattr(module.teacher, "head_gates")
    ids = torch.randint(3, 200, (1, 10))
    assert torch.equal(module.teacher(input_ids=ids).logits, tiny_model("llama")(input_ids=ids).logits)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"distillation": -0.1}, r"distillation=-0.1 must lie in \[0, 1\]"),
        ({"distillation": 1.5}, r"distillation=1.5 must lie in \[0, 1\]"),
        ({"distillation": math.nan}, r"distillation=nan must lie in \[0, 1\]"),
        ({"distillation_temperature": 0.0}, "distillation_temperature=0.0 must be positive and finite"),
        ({"distillation_temperature": -2.0}, "distillation_temperature=-2.0 must be positive and finite"),
        ({"distillation_temperature": math.inf}, "distillation_temperature=inf must be positive and finite"),
    ],
)
def test_bad_distillation_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GatedLanguageModel(tiny_model("llama"), **kwargs)


def test_the_cli_takes_the_distillation_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.distillation", "0.5", "--model.distillation_temperature", "4", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["model"]
    assert printed["distillation"] == 0.5 and printed["distillation_temperature"] == 4.0


class RankTeacher(L.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        teacher = pl_module.teacher
        torch.save(
            {
                "teacher": teacher.state_dict(),
                "training": teacher.training,
                "kl": float(trainer.callback_metrics["train_kl"]),
            },
            f"{self.folder}/rank{trainer.global_rank}.pt",
        )


def test_every_ddp_rank_distils_from_its_own_frozen_teacher(tmp_path):
    L.seed_everything(0)
    module = GatedLanguageModel(tiny_model("llama"), distillation=0.5, learning_rate=1e-2, warmup_ratio=0.0)
    dense = tiny_model("llama").state_dict()
    trainer = tiny_trainer(
        devices=2, strategy="ddp_spawn", max_steps=2, limit_val_batches=0, callbacks=[RankTeacher(str(tmp_path))]
    )
    trainer.fit(module, tiny_data())
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert not saved["training"] and saved["kl"] > 0
        assert all(torch.equal(saved["teacher"][k], v) for k, v in dense.items())


def test_the_teacher_before_pruning_is_the_model_as_it_was_before_each_pruning_event():
    module = perturbed(GatedLanguageModel(tiny_model("llama"), distillation=1.0, distillation_teacher="before_pruning"))
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(3, 200, (2, 12))}
    assert module.teacher is None  # no pruning yet: the plain loss
    nll_sum, tokens = causal_lm_nll(module.model, batch)
    assert torch.equal(step_loss(module, batch), nll_sum / tokens)
    with torch.no_grad():
        before = module.model(input_ids=batch["input_ids"]).logits
    module.gates.prune([(0, 1), (1, 2)])
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    notify_head_event(trainer, module, HeadEvent("prune", 0, 0, [(0, 1), (1, 2)], "test"))
    teacher = module.teacher
    assert teacher is not None and not teacher.training
    assert not any(parameter.requires_grad for parameter in teacher.parameters())
    with torch.no_grad():
        assert torch.allclose(teacher(input_ids=batch["input_ids"]).logits, before, atol=1e-6)
    assert step_loss(module, batch).item() > 1e-4  # the pruned student learns to write what it wrote before
    module.gates.prune([(1, 0)])  # the next event: the teacher has the first event's heads pruned, not these
    notify_head_event(trainer, module, HeadEvent("prune", 1, 0, [(1, 0)], "test"))
    assert module.teacher is not teacher
    assert find_gates(module.teacher).pruned_heads() == [(0, 1), (1, 2)]
    assert "teacher" not in str(list(module.state_dict()))


def test_an_unknown_teacher_is_named():
    with pytest.raises(ValueError, match=r"distillation_teacher='dense' is not one of \('loaded', 'before_pruning'\)"):
        GatedLanguageModel(tiny_model("llama"), distillation=0.5, distillation_teacher="dense")


def test_a_teacher_taken_at_pruning_travels_in_the_checkpoint(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    module = GatedLanguageModel(
        str(tmp_path / "tiny"), distillation=0.5, distillation_teacher="before_pruning", learning_rate=1e-2
    )
    pruning = HeadPruning(strategy="random", schedule={1: 0.25}, interval="step")
    trainer = tiny_trainer(max_steps=3, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[pruning])
    trainer.fit(module, tiny_data())
    assert module.teacher is not None and find_gates(module.teacher).sparsity == 0.0
    assert find_gates(module.model).sparsity == 0.25
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    restored = GatedLanguageModel.load_from_checkpoint(tmp_path / "run.ckpt")
    for key, value in module.teacher.state_dict().items():  # importance_at_pruning is NaN where never pruned
        torch.testing.assert_close(restored.teacher.state_dict()[key], value, rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(restored.model.model.embed_tokens.weight, restored.teacher.model.embed_tokens.weight)
