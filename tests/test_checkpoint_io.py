import json
import pickle
import statistics
import tracemalloc

import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from scripts_loader import load_script

from sentinel_lightning.checkpoint_io import StreamingCheckpointIO
from sentinel_lightning.tiny import tiny_model


def checkpoint(megabytes: int = 16) -> dict:
    torch.manual_seed(0)
    return {"state_dict": {"weight": torch.randn(megabytes * 2**18)}, "epoch": 3, "callbacks": {"x": [1, 2]}}


def test_a_streamed_checkpoint_loads_as_lightnings_own(tmp_path):
    saved = checkpoint()
    StreamingCheckpointIO().save_checkpoint(saved, tmp_path / "streamed.ckpt")
    TorchCheckpointIO().save_checkpoint(saved, tmp_path / "lightning.ckpt")
    streamed = StreamingCheckpointIO().load_checkpoint(tmp_path / "streamed.ckpt")
    reference = TorchCheckpointIO().load_checkpoint(tmp_path / "lightning.ckpt")
    assert torch.equal(streamed["state_dict"]["weight"], reference["state_dict"]["weight"])
    assert streamed["epoch"] == 3 and streamed["callbacks"] == {"x": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lightning.ckpt", "streamed.ckpt"]  # no temporary left


def peak_python_bytes(checkpoint_io, saved: dict, path) -> int:
    """Peak Python heap bytes during one save (the in-memory buffer of a buffered save is Python heap)."""
    tracemalloc.start()
    try:
        checkpoint_io.save_checkpoint(saved, path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_streamed_save_holds_no_copy_of_the_checkpoint_in_memory(tmp_path):
    saved = checkpoint(megabytes=16)
    buffered = peak_python_bytes(TorchCheckpointIO(), saved, tmp_path / "buffered.ckpt")
    streamed = peak_python_bytes(StreamingCheckpointIO(), saved, tmp_path / "streamed.ckpt")
    assert buffered > 16 * 2**20  # Lightning's save holds the whole serialised checkpoint
    assert streamed < 2 * 2**20


class Unpicklable:
    def __reduce__(self):
        raise pickle.PicklingError("not this one")


def test_a_file_url_is_written_where_it_points(tmp_path):
    StreamingCheckpointIO().save_checkpoint(checkpoint(1), f"file://{tmp_path}/url.ckpt")
    assert StreamingCheckpointIO().load_checkpoint(tmp_path / "url.ckpt")["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["url.ckpt"]


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    StreamingCheckpointIO().save_checkpoint(checkpoint(1), path)
    with pytest.raises(pickle.PicklingError, match="not this one"):
        StreamingCheckpointIO().save_checkpoint({**checkpoint(1), "bad": Unpicklable()}, path)
    assert StreamingCheckpointIO().load_checkpoint(path)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_the_benchmark_writes_both_plugins_side_by_side(tmp_path):
    script = load_script("benchmark_checkpoint_io")
    result = script.main(["--quick", "--rounds", "3", "--output-dir", str(tmp_path)])
    assert json.loads((tmp_path / "checkpoint_io.json").read_text()) == result
    assert all(len(times) == 3 for times in result["seconds"].values())
    ratios = [slow / fast for slow, fast in zip(result["seconds"]["lightning"], result["seconds"]["streamed"])]
    assert result["lightning_over_streamed"] == statistics.median(ratios)
    assert result["checkpoint_megabytes"] > 3 * 4 * tiny_parameters() / 1e6  # weights and two Adam moments
    assert "| tiny llama |" in (tmp_path / "checkpoint_io.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_io.json", "checkpoint_io.md"]


def tiny_parameters() -> int:
    return sum(p.numel() for p in tiny_model("llama").parameters())
