"""FSDP2 (Lightning's ModelParallelStrategy) on two CPU processes: the decisions of DDP, exact resume, export.

Each job is ``tests/fsdp_job.py`` under ``torch.distributed.run`` (the strategy launches no processes itself). The
reference is the same job under DDP, which ``tests/test_ddp.py`` checks against the single-process semantics.
"""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model, tiny_trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from sentinel_lightning.callbacks.head_metrics import HeadMetrics
from sentinel_lightning.callbacks.merging import KeyValueMerging
from sentinel_lightning.cli.export import export_checkpoint, load_checkpoint
from sentinel_lightning.module import GatedLanguageModel
from sentinel_lightning.saving import load_pruned
from sentinel_lightning.sharding import clip_gradients

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp_job.py")


def run_job(out, *arguments):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", JOB]
    done = subprocess.run([*command, "--out", str(out), *arguments], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    fsdp = run_job(root / "fsdp", "--strategy", "fsdp")
    ddp = run_job(root / "ddp", "--strategy", "ddp")
    first_epoch = str(root / "fsdp" / "ckpt" / "epoch=0-step=3.ckpt")
    resumed = run_job(root / "resumed", "--strategy", "fsdp", "--resume", first_epoch, "--sharded_checkpoints")
    return root, fsdp, ddp, resumed


def test_fsdp_shards_the_model_and_keeps_the_gates_whole(runs):
    _, (rank0, rank1), _, _ = runs
    assert rank0["sharded"] and rank1["sharded"]  # the decoder layers' weights are DTensors
    assert not rank0["gates_sharded"] and not rank1["gates_sharded"]
    assert torch.equal(rank0["active"], rank1["active"]) and torch.equal(rank0["values"], rank1["values"])


def test_fsdp_takes_the_decisions_of_ddp(runs):
    _, (fsdp, _), (ddp, _), _ = runs
    assert torch.equal(fsdp["active"], ddp["active"]) and int(fsdp["active"].sum()) == 4
    assert [(e["kind"], e["heads"], e["epoch"]) for e in fsdp["events"]] == [
        (e["kind"], e["heads"], e["epoch"]) for e in ddp["events"]
    ]
    # Same data, same reductions up to the order of float sums (FSDP reduce-scatters, DDP all-reduces).
    torch.testing.assert_close(fsdp["values"], ddp["values"], rtol=0, atol=1e-5)
    torch.testing.assert_close(fsdp["grad_norm"], ddp["grad_norm"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fsdp["reconstruction"], ddp["reconstruction"], rtol=0, atol=1e-3)
    assert fsdp["reconstruction"].abs().max() > 0.1  # linear compensation was fitted
    assert fsdp["val_ppl"] == pytest.approx(ddp["val_ppl"], rel=1e-5)


def test_fsdp_resumes_exactly_from_a_full_checkpoint(runs):
    _, (fsdp, _), _, (resumed, _) = runs
    assert torch.equal(resumed["active"], fsdp["active"]) and torch.equal(resumed["values"], fsdp["values"])
    assert torch.equal(resumed["reconstruction"], fsdp["reconstruction"])  # a buffer created before loading
    assert resumed["events"] == fsdp["events"] and resumed["val_ppl"] == fsdp["val_ppl"]


def test_export_of_a_sharded_checkpoint_folder_equals_the_full_one(runs, tokens, tmp_path):
    root, _, _, _ = runs
    full, folder = root / "fsdp" / "ckpt" / "epoch=2-step=9.ckpt", root / "resumed" / "ckpt" / "epoch=2-step=9.ckpt"
    assert full.is_file() and folder.is_dir()  # a file, and a folder of one shard per rank
    gated = load_checkpoint(str(full)).eval()
    summaries = [export_checkpoint(str(path), str(tmp_path / name)) for name, path in (("a", full), ("b", folder))]
    assert summaries[0]["heads_after"] == summaries[1]["heads_after"] == 4
    with torch.no_grad():
        expected = gated(tokens)
        for name in ("a", "b"):
            assert (load_pruned(str(tmp_path / name))(tokens).logits - expected).abs().max().item() <= 1e-4


def test_clip_gradients_equals_torch_on_whole_gradients():
    torch.manual_seed(0)
    parameters = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter) * 3
    reference = [torch.nn.Parameter(parameter.detach().clone()) for parameter in parameters]
    for copy, parameter in zip(reference, parameters):
        copy.grad = parameter.grad.clone()
    torch.nn.utils.clip_grad_norm_(reference, 0.5)
    expected = [copy.grad for copy in reference]
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    clip_gradients(optimizer, 0.5)
    for parameter, clipped in zip(parameters, expected):
        torch.testing.assert_close(parameter.grad, clipped)
    clip_gradients(optimizer, 0.01, "value")
    assert all(parameter.grad.abs().max() <= 0.01 for parameter in parameters)
    with pytest.raises(ValueError, match="gradient_clip_algorithm='max'"):
        clip_gradients(optimizer, 1.0, "max")


def test_sharded_runs_refuse_what_they_cannot_do(tmp_path):
    module = GatedLanguageModel(tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2))
    trainer = tiny_trainer(strategy=ModelParallelStrategy())
    with pytest.raises(ValueError, match=r"KeyValueMerging.*ModelParallelStrategy"):
        KeyValueMerging(num_key_value_heads=1).setup(trainer, module, "fit")
    (tmp_path / "not_a_checkpoint").mkdir()
    with pytest.raises(ValueError, match=r"ckpt_path=.*not_a_checkpoint.*meta\.pt"):
        export_checkpoint(str(tmp_path / "not_a_checkpoint"), str(tmp_path / "out"))


def test_fsdp1_is_refused_by_name():
    module = GatedLanguageModel(tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2))
    trainer = SimpleNamespace(strategy=FSDPStrategy())  # a Trainer refuses FSDPStrategy on the CPU itself
    metrics = HeadMetrics()
    metrics.setup(tiny_trainer(), module, "fit")
    with pytest.raises(ValueError, match=r"HeadMetrics: strategy=FSDPStrategy \(FSDP1\).*ModelParallelStrategy"):
        metrics.on_train_start(trainer, module)
