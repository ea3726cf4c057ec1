"""No silent wrong model, checkpoint or schedule (issue 18): each way a run, a checkpoint or a folder could lie."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import tiny_data, tiny_model, tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_compaction import pruned_model
from test_saving import load_without_package

from sentinel_lightning import GatedLanguageModel, HeadMetrics, HeadPruning, compact, load_pruned, save_pruned
from sentinel_lightning.cli import main
from sentinel_lightning.cli.fit import lightning_cli
from sentinel_lightning.gates import attach_gates
from sentinel_lightning.tiny import save_tiny_model


def write_job(tmp_path, model_dir, max_epochs=1, **pruning):
    config = {
        "trainer": {
            "max_epochs": max_epochs, "limit_train_batches": 4, "limit_val_batches": 2,
            "default_root_dir": str(tmp_path), "enable_progress_bar": False,
        },
        "model": {"model": str(model_dir), "learning_rate": 1e-3},
        "data": {"block_size": 32, "batch_size": 2, "cache": False},
        "pruning": {"strategy": "random", "compensate": False, "unit": "head", "scope": "global",
                    "schedule": {0: 0.75}, **pruning},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One CLI run pruning 75% of the heads at the end of its only epoch: (config, model folder, log folder)."""
    tmp_path = tmp_path_factory.mktemp("job")
    model_dir = Path(save_tiny_model(str(tmp_path / "tiny-llama")))
    config = write_job(tmp_path, model_dir)
    main(["fit", "--config", str(config)])
    return config, model_dir, tmp_path / "lightning_logs" / "version_0" / "checkpoints"


# 2. The best checkpoint holds the model its monitored value was measured on.

def test_the_best_checkpoint_holds_the_model_its_val_ppl_was_measured_on(job):
    config, _, checkpoints = job
    [best] = list((checkpoints / "best").glob("*.ckpt"))
    saved = torch.load(best, map_location="cpu", weights_only=False)
    [score] = [state["best_model_score"] for key, state in saved["callbacks"].items()
               if key.startswith("ModelCheckpoint") and state["monitor"] == "val_ppl"]
    measured = lightning_cli(["validate", "--config", str(config), "--ckpt_path", str(best)])
    assert float(measured.trainer.callback_metrics["val_ppl"]) == pytest.approx(float(score), rel=1e-5)
    assert float(re.search(r"val_ppl=([\d.]+)\.ckpt", best.name).group(1)) == pytest.approx(float(score), abs=1e-3)
    # last.ckpt is the model at the end of the epoch, after its pruning
    last = GatedLanguageModel.load_from_checkpoint(checkpoints / "last.ckpt", map_location="cpu")
    assert last.gates.sparsity == 0.75


# 6. Exporting into the checkpoint's own model folder is refused, even with --overwrite.

@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_export_refuses_the_checkpoints_own_model_folder(job, where):
    _, model_dir, checkpoints = job
    output = {"same": model_dir, "inside": model_dir / "pruned", "parent": model_dir.parent}[where]
    before = sorted(p.name for p in model_dir.iterdir())
    with pytest.raises(ValueError, match=r"the model folder that ckpt_path=.* was trained from \(--model.model\)"):
        main(["export", "--ckpt_path", str(checkpoints / "last.ckpt"), "--output_dir", str(output),
              "--overwrite", "true"])
    assert sorted(p.name for p in model_dir.iterdir()) == before


# 4. The command line refuses a float or a word as a schedule key, by name.

@pytest.mark.parametrize("value, shown", [("{1.5: 0.25}", "1.5"), ("{x: 0.25}", "'x'")])
def test_the_command_line_refuses_a_schedule_key_that_is_not_an_integer(tmp_path, value, shown):
    config = write_job(tmp_path, save_tiny_model(str(tmp_path / "tiny")))
    message = rf"--pruning.schedule=.* has the key {re.escape(shown)}; with interval='step' every key is an integer"
    with pytest.raises(ValueError, match=message):
        main(["fit", "--config", str(config), "--pruning.interval", "step", "--pruning.schedule", value])


def test_step_schedule_errors_speak_of_steps():
    with pytest.raises(ValueError, match=r"decreases at step 3"):
        HeadPruning(schedule={2: 0.5, 3: 0.25}, interval="step")
    with pytest.raises(ValueError, match=r"schedule step 2 has target 1.0"):
        HeadPruning(schedule={2: 1.0}, interval="step")
    assert HeadPruning(schedule={"2": 0.5}, interval="step").schedule == {2: 0.5}  # a YAML key saved as a string


# 3. A schedule the run cannot reach is said, before training and at its end.

def test_a_step_schedule_beyond_the_run_is_warned_before_training():
    pruning = HeadPruning(strategy="random", schedule={100: 0.5}, interval="step")
    with pytest.warns(UserWarning, match=r"end the run at step 8, before the scheduled step 100 \(target 0.5\)"):
        tiny_trainer(max_epochs=2, limit_val_batches=0, callbacks=[pruning]).fit(
            GatedLanguageModel(tiny_model("llama")), tiny_data()
        )


def test_an_epoch_schedule_beyond_max_epochs_is_warned_before_training():
    pruning = HeadPruning(strategy="random", schedule={0: 0.25, 1: 0.5, 2: 0.75})
    with pytest.warns(UserWarning, match=r"end the run at epoch 1, before the scheduled epoch 2 \(target 0.75\)"):
        tiny_trainer(max_epochs=2, limit_val_batches=0, callbacks=[pruning]).fit(
            GatedLanguageModel(tiny_model("llama")), tiny_data()
        )


class StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def test_a_run_that_stops_early_says_which_targets_it_missed(recwarn):
    pruning = HeadPruning(strategy="random", schedule={0: 0.25, 2: 0.5})
    trainer = tiny_trainer(max_epochs=3, limit_val_batches=0, callbacks=[pruning, StopAfterFirstEpoch()])
    trainer.fit(GatedLanguageModel(tiny_model("llama")), tiny_data())
    messages = [str(w.message) for w in recwarn if "HeadPruning" in str(w.message)]
    assert not any("limits" in m for m in messages)  # reachable when training started
    missed = r"stopped at epoch 1, step 4, before the scheduled epoch 2 \(target 0.5\)"
    assert any(re.search(missed, m) for m in messages)


def test_a_reachable_schedule_is_not_warned_about(recwarn):
    pruning = HeadPruning(strategy="random", schedule={0: 0.25, 1: 0.5})
    tiny_trainer(max_epochs=2, limit_val_batches=0, callbacks=[pruning]).fit(
        GatedLanguageModel(tiny_model("llama")), tiny_data()
    )
    assert pruning._gates.sparsity == 0.5
    assert not [w for w in recwarn if "scheduled" in str(w.message)]


# 5. A checkpoint written inside an epoch is refused for resuming; one written at an epoch end resumes.

def test_resuming_inside_an_epoch_is_refused_and_at_its_end_allowed(tmp_path):
    saving = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    tiny_trainer(max_epochs=2, max_steps=6, limit_val_batches=0, callbacks=[saving], enable_checkpointing=True).fit(
        GatedLanguageModel(tiny_model("llama")), tiny_data()
    )
    with pytest.raises(ValueError, match=r"after 1 of the 4 training batches of epoch 1.*resumes only at epoch ends"):
        tiny_trainer(max_epochs=2, limit_val_batches=0).fit(
            GatedLanguageModel(tiny_model("llama")), tiny_data(), ckpt_path=tmp_path / "step=5.ckpt"
        )
    resumed = tiny_trainer(max_epochs=2, limit_val_batches=0)
    resumed.fit(GatedLanguageModel(tiny_model("llama")), tiny_data(), ckpt_path=tmp_path / "step=4.ckpt")
    assert resumed.global_step == 8


# 7. The before_pruning teacher is the model just before the event, compensation of earlier heads included.

class RecordLogits(L.Callback):
    """Records the model's logits on ``tokens`` at the end of step ``step``, before the callbacks after it run."""

    def __init__(self, tokens, step):
        self.tokens, self.step, self.logits = tokens, step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                self.logits = pl_module.model(input_ids=self.tokens).logits


def test_the_before_pruning_teacher_is_copied_before_earlier_heads_are_refitted():
    tokens = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    module = GatedLanguageModel(tiny_model("llama"), distillation=0.5, distillation_teacher="before_pruning",
                                learning_rate=1e-2)
    record = RecordLogits(tokens, step=2)
    pruning = HeadPruning(strategy="random", schedule={1: 0.25, 2: 0.5}, interval="step", scope="layer",
                          compensate="linear")
    tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=[HeadMetrics(), record, pruning]).fit(module, tiny_data())
    assert len(pruning.events) == 2  # the second event prunes into layers whose first pruned head is compensated
    with torch.no_grad():
        teacher = module.teacher(input_ids=tokens).logits
    torch.testing.assert_close(teacher, record.logits, rtol=0, atol=1e-6)


# HeadPruning before HeadMetrics decides on the same statistics as after it.

def test_the_order_of_head_metrics_and_head_pruning_does_not_matter():
    results = []
    for metrics_first in (True, False):
        module = GatedLanguageModel(tiny_model("llama"))
        pruning = HeadPruning(strategy="gradient", schedule={1: 0.25, 2: 0.5}, interval="step", compensate="linear")
        callbacks = [HeadMetrics(), pruning] if metrics_first else [pruning, HeadMetrics()]
        torch.manual_seed(0)
        tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=callbacks).fit(module, tiny_data())
        results.append((module.gates.pruned_heads(), module.gates.compensation.clone(),
                        module.gates.reconstruction.clone()))
    (heads_a, mean_a, fit_a), (heads_b, mean_b, fit_b) = results
    assert heads_a == heads_b
    torch.testing.assert_close(mean_b, mean_a, rtol=0, atol=0)
    torch.testing.assert_close(fit_b, fit_a, rtol=0, atol=0)
    assert fit_a.abs().sum() > 0


# 1. A folder that needs its modeling code never loads in plain transformers; with it, it loads exactly.

REFUSED_WITHOUT_PACKAGE = '''
import re
import sys


class HidePackage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "sentinel_lightning":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")


sys.meta_path.insert(0, HidePackage())
from transformers import AutoModelForCausalLM

folder, trust, pattern = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
try:
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust)
except ValueError as error:
    assert re.search(pattern, str(error)), str(error)
    print("refused")
else:
    raise SystemExit("loaded")
'''


def refused_without_package(folder, tmp_path, trust_remote_code: bool, pattern: str) -> None:
    """Asserts that ``from_pretrained(folder)`` raises a ValueError matching ``pattern`` where the package is hidden."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-I", "-c", REFUSED_WITHOUT_PACKAGE, str(folder), "1" if trust_remote_code else "0", pattern],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "refused", result.stdout + result.stderr[-3000:]


def compensated_uniform(family):
    """Every layer loses one query head of each of its 2 groups; the pruned heads write a mean output (a bias)."""
    gated = tiny_model(family, num_layers=2, num_heads=6, num_kv_heads=2, width=48)
    compensation = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))
    attach_gates(gated).prune([(0, 0), (0, 4), (1, 2), (1, 3)], compensation=compensation)
    return gated


@pytest.mark.parametrize("layout", ["layer_pruned_llama", "uniform_qwen2_with_bias", "uniform_mistral_with_bias"])
def test_a_folder_that_needs_its_modeling_code_does_not_load_without_it(layout, tokens, tmp_path):
    gated = pruned_model("llama") if layout == "layer_pruned_llama" else compensated_uniform(layout.split("_")[1])
    compacted = compact(gated)
    save_pruned(compacted, str(tmp_path / "model"))
    refused_without_package(tmp_path / "model", tmp_path, False, r"trust_remote_code=True")
    load_without_package(tmp_path / "model", compacted, tokens, tmp_path, trust_remote_code=True)
    with torch.no_grad():
        difference = (load_pruned(str(tmp_path / "model"))(tokens).logits - compacted(tokens).logits).abs().max()
    assert difference.item() <= 1e-5


def test_a_uniform_folder_without_bias_stays_a_plain_folder(tmp_path):
    gated = tiny_model("llama", num_layers=2, num_heads=6, num_kv_heads=2, width=48)
    attach_gates(gated).prune([(0, 0), (0, 4), (1, 2), (1, 3)])
    save_pruned(gated, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"


# The errors that did not say what is wrong.

def edited_folder(tmp_path, **fields):
    """A saved ``pruned_model("llama")`` whose config.json gets ``fields`` (None: the field removed)."""
    folder = tmp_path / "edited"
    save_pruned(pruned_model("llama"), str(folder))
    config = json.loads((folder / "config.json").read_text())
    for name, value in fields.items():
        if value is None:
            config.pop(name)
        else:
            config[name] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("edit", ["removed", "null"])
def test_a_missing_or_null_kept_heads_is_named(edit, tmp_path):
    folder = edited_folder(tmp_path, kept_heads=None)
    if edit == "null":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "kept_heads": None}))
    with pytest.raises(ValueError, match=r"config\.kept_heads is missing or null"):
        load_pruned(str(folder))


@pytest.mark.parametrize(
    "kept_heads, message",
    [([[], [3, 3, 1], [0, 2]], r"kept_heads\[1\] = \[3, 3, 1\] must be distinct"),
     ([[], [1, 2, 9], [0, 2]], r"kept_heads\[1\] = \[1, 2, 9\] holds 9")],
)
def test_the_shipped_modeling_code_checks_kept_heads_as_load_pruned_does(kept_heads, message, tmp_path):
    folder = edited_folder(tmp_path, kept_heads=kept_heads)
    with pytest.raises(ValueError, match=message):
        load_pruned(str(folder))
    refused_without_package(folder, tmp_path, True, message)


def test_gating_a_model_compacted_to_unequal_layers_is_refused(tmp_path):
    save_pruned(pruned_model("llama"), str(tmp_path / "model"))
    with pytest.raises(ValueError, match=r"re-pruning such a model is not supported"):
        attach_gates(load_pruned(str(tmp_path / "model")))
    config = write_job(tmp_path, tmp_path / "model")
    with pytest.raises(ValueError, match=r"model=.* is a compacted folder .*re-pruning such a model is not supported"):
        main(["fit", "--config", str(config)])


def test_save_pruned_refuses_an_empty_directory_name():
    with pytest.raises(ValueError, match=r"directory='' must be the path of a folder"):
        save_pruned(tiny_model("llama"), "")
