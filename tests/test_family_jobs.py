"""The job end to end on a saved tiny model of every family: fit with pruning, export, load with the same logits."""

import os

import pytest
import torch
import yaml
from conftest import FAMILIES
from transformers import AutoModelForCausalLM

from sentinel_lightning import GatedLanguageModel, load_pruned
from sentinel_lightning.cli import main
from sentinel_lightning.saving import MODELING_MODULE
from sentinel_lightning.standalone import families as registry
from sentinel_lightning.tiny import save_tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_the_job_fits_prunes_exports_and_loads(family, tmp_path, capsys):
    """The default job (linear compensation, the compensated score) with a tiny budget, pruning half the heads in
    whole groups of the same shape in every layer (whole layers where only those leave exactly: OLMo 2)."""
    entry = registry.FAMILIES[family]
    model_dir = save_tiny_model(str(tmp_path / f"tiny-{family}"), family)
    unit, scope = ("group", "uniform") if entry.compacts_heads else ("layer", "global")
    config = {
        "trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1,
                    "default_root_dir": str(tmp_path), "enable_progress_bar": False},
        "model": {"model": model_dir},
        "data": {"block_size": 32, "batch_size": 2, "cache": False},
        "pruning": {"schedule": {0: 0.5}, "unit": unit, "scope": scope},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp_path / "job.yaml")])
    checkpoint = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert "pruned fraction" in capsys.readouterr().out and checkpoint.is_file()

    output = tmp_path / "pruned"
    main(["export", "--ckpt_path", str(checkpoint), "--output_dir", str(output)])
    assert "4/8 heads kept" in capsys.readouterr().out

    module = GatedLanguageModel.load_from_checkpoint(checkpoint).eval()
    loaded = load_pruned(str(output))
    tokens = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(tokens)
        assert (loaded(tokens).logits - expected).abs().max().item() <= 1e-4
    # A uniform layout whose config states the compensation's output biases is a stock folder.
    stock = entry.compacts_heads and entry.config_has_head_dim and entry.bias_attribute is not None
    assert os.path.isfile(output / f"{MODELING_MODULE}.py") == (not stock)
    if stock:
        with torch.no_grad():
            plain = AutoModelForCausalLM.from_pretrained(str(output))(tokens).logits
        assert (plain - expected).abs().max().item() <= 1e-4
