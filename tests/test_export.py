"""``sentinel-lightning export``: key/value-cache bytes per token before and after, no silent overwrite."""

import os

import pytest
import torch
from conftest import tiny_data, tiny_model, tiny_trainer

from sentinel_lightning import GatedLanguageModel
from sentinel_lightning.cli import main
from sentinel_lightning.cli.export import export_checkpoint
from sentinel_lightning.compaction import kv_cache_bytes_per_token
from sentinel_lightning.saving import load_pruned


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of Llama, 2 layers of 4 query heads in 2 groups (head dim 8, float32), that lost query heads
    0 and 1 of layer 0 (its whole first group) and query head 0 of layer 1 (its groups unequal, 1 and 2)."""
    folder = tmp_path_factory.mktemp("run")
    module = GatedLanguageModel(model=tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2))
    trainer = tiny_trainer(max_steps=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(module, tiny_data(block_size=32, batch_size=2))
    module.gates.prune([(0, 0), (0, 1), (1, 0)])
    trainer.save_checkpoint(folder / "run.ckpt")
    return folder / "run.ckpt", module


def test_export_prints_and_returns_the_key_value_cache_bytes_per_token(checkpoint, tmp_path, capsys):
    path, module = checkpoint
    summary = export_checkpoint(str(path), str(tmp_path / "export"))

    # 2 (keys, values) * 8 (head dim) * 4 bytes per key/value head: 2 + 2 heads before, 1 + 2 after.
    assert summary["kv_cache_bytes_per_token_before"] == 4 * 64 == kv_cache_bytes_per_token(module.model)
    loaded = load_pruned(str(tmp_path / "export"))
    assert summary["kv_cache_bytes_per_token_after"] == 3 * 64 == kv_cache_bytes_per_token(loaded)
    printed = capsys.readouterr().out
    assert "5/8 heads kept" in printed and "key/value cache 256 -> 192 bytes per token" in printed
    assert f"parameters {summary['parameters_before']:,} -> {summary['parameters_after']:,}" in printed
    # Unequal layers: only the shipped modeling code opens the folder, and export says so.
    assert summary["loads_without_remote_code"] is False and "trust_remote_code=True only" in printed
    # The bytes bound at 4,096 tokens of context, from the weights and the cache before and after.
    moved = [summary[f"bytes_{when}"] + summary[f"kv_cache_bytes_per_token_{when}"] * 4096
             for when in ("before", "after")]
    assert summary["decode_bound_4096"] == pytest.approx(moved[0] / moved[1]) and summary["decode_bound_4096"] > 1
    assert f"decoding after 4,096 tokens at most {summary['decode_bound_4096']:.3f}x as fast" in printed


def test_export_says_a_uniform_folder_loads_in_plain_transformers(tmp_path, capsys):
    module = GatedLanguageModel(model=tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2))
    trainer = tiny_trainer(max_steps=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(module, tiny_data(block_size=32, batch_size=2))
    module.gates.prune([(0, 0), (0, 1), (1, 2), (1, 3)])  # one whole group in every layer
    trainer.save_checkpoint(tmp_path / "run.ckpt")

    summary = export_checkpoint(str(tmp_path / "run.ckpt"), str(tmp_path / "export"))

    assert summary["loads_without_remote_code"] is True and "loads in plain transformers" in capsys.readouterr().out
    assert summary["kv_cache_bytes_per_token_after"] * 2 == summary["kv_cache_bytes_per_token_before"]


def test_export_refuses_a_non_empty_output_dir_unless_overwrite(checkpoint, tmp_path, capsys):
    path, module = checkpoint
    output = tmp_path / "pruned"
    output.mkdir()
    (output / "README.md").write_text("mine")
    (output / "pytorch_model.bin").write_text("an older model")
    arguments = ["export", "--ckpt_path", str(path), "--output_dir", str(output)]
    with pytest.raises(FileExistsError, match=r"pruned'.*README\.md.*--overwrite true"):
        main(arguments)
    assert sorted(os.listdir(output)) == ["README.md", "pytorch_model.bin"]  # nothing written

    main([*arguments, "--overwrite", "true"])
    assert "key/value cache 256 -> 192 bytes per token" in capsys.readouterr().out
    assert (output / "README.md").read_text() == "mine"
    assert not os.path.exists(output / "pytorch_model.bin")  # the stale weights are gone
    tokens = torch.randint(3, 257, (1, 10))
    module.eval()
    with torch.no_grad():
        assert (load_pruned(str(output))(tokens).logits - module(tokens)).abs().max().item() <= 1e-4


def test_export_refuses_an_output_dir_that_is_a_file(checkpoint, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="directory="):
        export_checkpoint(str(checkpoint[0]), str(tmp_path / "file"), overwrite=True)
