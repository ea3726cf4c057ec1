"""LoRA fine-tunes: adapters and gates trained, base weights frozen, the callbacks as on a full fine-tune, and
``compact`` merging the adapters exactly (of a ``PeftModel``, after ``merge_and_unload``, from a checkpoint)."""

import copy

import lightning as L
import pytest
import torch
import yaml
from conftest import VOCAB, tiny_data, tiny_model, tiny_trainer
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from test_user_module import TupleBatchModule, tuple_loader
from transformers import AutoModelForCausalLM

from sentinel_lightning import GatedLanguageModel, HeadMetrics, HeadPruning, compact, find_gates
from sentinel_lightning.cli import main
from sentinel_lightning.compaction import count_parameters, weight_bytes
from sentinel_lightning.gates import attach_gates, find_causal_lm
from sentinel_lightning.lora import gates_hooked
from sentinel_lightning.tiny import save_tiny_model

TARGETS = ["q_proj", "v_proj", "o_proj"]


def randomise_adapters(model, seed=0):
    """LoRA's B starts at zero (the adapter adds nothing): random B makes a merge that drops adapters visible."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def pruned_lora_llama():
    """A tiny Llama with r=4 adapters on q/v/o, gates on the wrapped projections, 3 heads pruned, layer 0 with a
    linear compensation."""
    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=TARGETS))
    randomise_adapters(peft_model)
    gates = attach_gates(find_causal_lm(peft_model))
    gates.prune([(0, 1), (1, 2), (1, 3)])
    size = gates.num_heads * gates.head_dim
    matrix = torch.zeros(size, size)
    matrix[8:16, 0:8] = torch.randn(8, 8, generator=torch.Generator().manual_seed(1)) * 0.1  # head 1 from head 0
    gates.set_linear_compensation(0, torch.randn(gates.num_heads, gates.head_dim) * 0.1, matrix)
    return peft_model.eval()


def max_difference(a, b, tokens):
    with torch.no_grad():
        return (a(input_ids=tokens).logits - b(input_ids=tokens).logits).abs().max().item()


def test_compact_merges_the_adapters_of_a_pruned_peft_model(tokens):
    peft_model = pruned_lora_llama()
    before = copy.deepcopy(peft_model.state_dict())
    compacted = compact(peft_model)
    assert max_difference(compacted, peft_model, tokens) <= 1e-5
    assert not any(isinstance(module, BaseTunerLayer) for module in compacted.modules())
    assert count_parameters(compacted) < count_parameters(tiny_model("llama"))
    # Served merged, a LoRA model holds the base weights: its adapters are not counted.
    assert count_parameters(peft_model) == count_parameters(tiny_model("llama"))
    assert weight_bytes(peft_model) == weight_bytes(tiny_model("llama"))
    after = peft_model.state_dict()
    for name in before:  # the input is left as it was
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, equal_nan=True)


def test_compact_after_merge_and_unload_keeps_the_gates(tokens):
    peft_model = pruned_lora_llama()
    reference = copy.deepcopy(peft_model)
    merged = peft_model.merge_and_unload()
    assert not gates_hooked(merged)  # peft replaced the projections the gates were hooked on
    assert max_difference(compact(merged), reference, tokens) <= 1e-5


def test_lora_arguments_are_checked():
    with pytest.raises(ValueError, match="lora="):
        GatedLanguageModel(model=tiny_model("llama"), lora={"rank": 4})
    with pytest.raises(ValueError, match="lora="):
        GatedLanguageModel(model=tiny_model("llama"), lora=4)


def test_a_lora_fit_trains_adapters_and_gates_only_and_the_callbacks_work(tokens):
    L.seed_everything(0)
    base = tiny_model("llama")
    module = GatedLanguageModel(model=base, lora={"r": 4, "target_modules": TARGETS}, learning_rate=1e-2)
    frozen = {name: p.detach().clone() for name, p in module.named_parameters() if not p.requires_grad}
    trained = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in trained) and module.gates.values.requires_grad
    assert all("lora_" in name or name.endswith("head_gates.values") for name in trained)
    metrics = HeadMetrics(entropy_every_n_steps=2)
    pruning = HeadPruning("gradient_compensated", {0: 0.25}, compensate="linear")
    trainer = tiny_trainer(max_epochs=1, callbacks=[metrics, pruning])
    trainer.fit(module, tiny_data(block_size=32, batch_size=2))

    assert all(torch.equal(p, frozen[name]) for name, p in module.named_parameters() if name in frozen)
    changed = [name for name, p in module.named_parameters() if name in trained and not torch.equal(p, trained[name])]
    assert any("lora_B" in name for name in changed) and any("head_gates" in name for name in changed)
    assert module.gates.num_active == 6 and module.gates.reconstruction is not None
    (event,) = pruning.events  # chosen by the gradients through frozen weights
    assert len(event.heads) == 2
    assert gates_hooked(find_causal_lm(module.model))
    module.eval()
    assert max_difference(compact(module), module.model, tokens) <= 1e-5


class PeftTupleModule(TupleBatchModule):
    """A user's own module holding a peft LoRA model, fed ``(input_ids,)`` tuples (the steps of TupleBatchModule)."""

    def __init__(self):
        super().__init__(family="llama")
        self.lm = get_peft_model(tiny_model("llama").train(), LoraConfig(r=4, target_modules=TARGETS))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_a_users_own_peft_module_works_with_the_callbacks(tokens):
    L.seed_everything(0)
    module = PeftTupleModule()
    metrics = HeadMetrics(reset_on_prune=False)
    pruning = HeadPruning("gradient", {0: 0.25}, monitor="val_loss", compensate="linear")
    trainer = tiny_trainer(max_epochs=1, callbacks=[metrics, pruning])
    trainer.fit(module, tuple_loader(), tuple_loader(seed=1))
    gates = find_gates(module)
    assert gates.num_active == 6 and gates.reconstruction is not None
    importance = metrics.compute()["grad_norm"]  # through frozen weights, every head
    assert (importance > 0).all() and torch.isfinite(importance).all()
    assert gates_hooked(find_causal_lm(module))
    module.eval()
    assert max_difference(compact(module), module.lm, tokens) <= 1e-5


def test_a_lora_job_from_the_command_line_exports_a_folder_plain_transformers_loads(tmp_path, tokens):
    model_dir = save_tiny_model(str(tmp_path / "tiny-llama"))
    config = {
        "trainer": {
            "max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 1, "default_root_dir": str(tmp_path),
            "enable_progress_bar": False,
        },
        "model": {"model": model_dir, "learning_rate": 1e-2, "lora": {"r": 4, "target_modules": TARGETS}},
        "data": {"block_size": 32, "batch_size": 2, "cache": False},
        "pruning": {"schedule": {0: 0.5}, "unit": "group", "scope": "uniform"},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp_path / "config.yaml")])
    (checkpoint,) = tmp_path.glob("lightning_logs/version_0/checkpoints/last.ckpt")
    main(["export", "--ckpt_path", str(checkpoint), "--output_dir", str(tmp_path / "pruned")])

    module = GatedLanguageModel.load_from_checkpoint(str(checkpoint), map_location="cpu").eval()
    assert module.hparams.lora == {"r": 4, "target_modules": TARGETS}
    assert any(isinstance(m, BaseTunerLayer) for m in module.modules()) and module.gates.num_active == 4
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned"))  # plain transformers: uniform
    assert (loaded.config.num_attention_heads, loaded.config.num_key_value_heads) == (2, 1)
    assert max_difference(loaded, module.model, tokens.clamp_max(VOCAB - 1)) <= 1e-4
