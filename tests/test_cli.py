import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_job_defaults
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sentinel_lightning import GatedLanguageModel, LanguageModelingDataModule, load_pruned
from sentinel_lightning.callbacks import DivergenceGuard, GateMonitor, HeadMetrics, HeadPruning, HeadReactivation
from sentinel_lightning.checkpoint_io import StreamingCheckpointIO
from sentinel_lightning.cli import main
from sentinel_lightning.cli.configs import packaged_configs, resolve_config
from sentinel_lightning.cli.fit import JOB_DEFAULTS, SEED, TRAINER_DEFAULTS, SentinelCLI, print_fit_report
from sentinel_lightning.cli.precision import job_precision
from sentinel_lightning.events import find_callback
from sentinel_lightning.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "sentinel_lightning" / "configs"


@pytest.fixture
def tiny_model_dir(tmp_path):
    return Path(save_tiny_model(str(tmp_path / "tiny-llama")))


def write_config(tmp_path, model_dir, **overrides):
    config = {
        "trainer": {
            "max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 2, "default_root_dir": str(tmp_path),
            "enable_progress_bar": False,
        },
        "model": {"model": str(model_dir), "learning_rate": 1e-3},
        "data": {"block_size": 32, "batch_size": 2, "cache": False},
        "pruning": {"strategy": "random", "schedule": {0: 0.25, 1: 0.5}},
        **overrides,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_from_a_yaml_config_then_validate_the_checkpoint(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir)
    main(["fit", "--config", str(config)])
    report = capsys.readouterr().out
    assert "validation perplexity before" in report and "validation perplexity after" in report
    assert "pruned fraction" in report and "0.500" in report
    assert job_precision(None, "auto")[0] in report  # the precision the job picked on this device
    checkpoints = list(tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt"))
    events = list(tmp_path.glob("lightning_logs/version_0/events.out.tfevents.*"))
    assert len(checkpoints) == 1 and events
    main(["validate", "--config", str(config), "--ckpt_path", str(checkpoints[0])])
    assert "val_ppl" in capsys.readouterr().out
    images = EventAccumulator(str(events[0].parent)).Reload().Tags()["images"]
    assert "gates/heatmap" in images  # the GateMonitor group is on by default

    main(["export", "--ckpt_path", str(checkpoints[0]), "--output_dir", str(tmp_path / "pruned")])
    assert "4/8 heads kept" in capsys.readouterr().out
    assert load_pruned(str(tmp_path / "pruned")).config.num_hidden_layers == 2
    main(["evaluate", "--ckpt_path", str(checkpoints[0]), "--block_size", "32", "--max_batches", "1",
          "--num_tokens", "4", "--num_runs", "1"])
    report = capsys.readouterr().out
    assert "before" in report and "after" in report and "perplexity" in report


def test_the_fit_report_flags_a_model_less_pruned_than_scheduled(capsys):
    report = {"val_ppl_before": 17.0, "val_ppl_after": 8.0, "pruned_heads": [], "total_heads": 270,
              "pruned_fraction": 0.0, "scheduled_fraction": 90 / 270, "checkpoint": "last.ckpt", "best_checkpoint": ""}
    print_fit_report(report)
    assert "scheduled fraction" in capsys.readouterr().out
    print_fit_report({**report, "pruned_fraction": 90 / 270, "pruned_heads": [(0, 0)] * 90})
    assert "scheduled fraction" not in capsys.readouterr().out


@pytest.mark.parametrize("name", ["entropy", "gradient", "random"])
def test_a_strategy_config_gives_the_job_a_pruning_callback_with_that_strategy(name, tiny_model_dir, tmp_path):
    cli = SentinelCLI(
        GatedLanguageModel, LanguageModelingDataModule, trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=SEED, run=False,
        args=["--config", resolve_config(f"{name}.yaml"), f"--model.model={tiny_model_dir}",
              f"--trainer.default_root_dir={tmp_path}"],
    )
    pruning = find_callback(cli.trainer, HeadPruning)
    assert pruning.strategy_name == name
    assert pruning.schedule == JOB_DEFAULTS["pruning.schedule"]  # every other setting as in the default job


def test_bad_schedule_values_are_checked(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, pruning={"strategy": "random", "schedule": {0: 1.5}})
    with pytest.raises(ValueError, match=r"target 1.5"):
        main(["fit", "--config", str(config)])


def _printed_config(*args):
    result = subprocess.run(
        [sys.executable, "-m", "sentinel_lightning.cli", "fit", *args, "--print_config"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    return yaml.safe_load(result.stdout)


def test_configs_default_yaml_is_the_built_in_default():
    assert _printed_config("--config", "configs/default.yaml") == _printed_config()


def _printed_in_process(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", ["entropy.yaml", "entropy", "configs/entropy.yaml"])
def test_a_packaged_config_by_name_works_from_any_folder(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    printed = _printed_in_process(capsys, "--config", name)
    assert printed["pruning"]["strategy"] == "entropy"
    assert printed["trainer"]["limit_train_batches"] == TRAINER_DEFAULTS["limit_train_batches"]


def test_an_unknown_config_name_errors_with_the_packaged_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "entorpy.yaml", "--print_config"])
    message = str(exit_info.value.code)
    assert "--config='entorpy.yaml'" in message
    assert all(f"{name}.yaml" in message for name in ("default", "entropy", "gradient", "random"))


CALLBACK_GROUPS = {
    "metrics": HeadMetrics, "pruning": HeadPruning, "reactivation": HeadReactivation, "gate_monitor": GateMonitor,
    "divergence": DivergenceGuard,
}


def test_the_job_defaults_come_from_one_place(capsys):
    assert set(packaged_configs()) == {"default", "entropy", "gradient", "random"}
    printed = _printed_in_process(capsys)
    assert_job_defaults(printed)
    assert {key: printed["trainer"][key] for key in TRAINER_DEFAULTS} == TRAINER_DEFAULTS
    # Every other callback setting is the class's own default.
    for group, callback in CALLBACK_GROUPS.items():
        for name, parameter in inspect.signature(callback).parameters.items():
            if f"{group}.{name}" not in JOB_DEFAULTS:
                assert printed[group][name] == parameter.default, f"{group}.{name}"
    # The packaged default.yaml states exactly these defaults, and running with it is running without a config.
    stated = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert stated.pop("trainer") == TRAINER_DEFAULTS and stated.pop("seed_everything") == SEED
    assert {f"{group}.{name}": value for group, values in stated.items() for name, value in values.items()} == (
        JOB_DEFAULTS
    )
    assert _printed_in_process(capsys, "--config", "default.yaml") == printed


def job_trainer(tmp_path, model_dir, *options):
    config = write_config(tmp_path, model_dir)
    cli = SentinelCLI(GatedLanguageModel, LanguageModelingDataModule, run=False,
                      args=["--config", str(config), *options])
    return cli.trainer


def test_the_job_streams_its_checkpoints_unless_given_a_checkpoint_io(tmp_path, tiny_model_dir):
    assert isinstance(job_trainer(tmp_path, tiny_model_dir).strategy.checkpoint_io, StreamingCheckpointIO)
    own = "lightning.fabric.plugins.io.torch_io.TorchCheckpointIO"
    trainer = job_trainer(tmp_path, tiny_model_dir, f"--trainer.plugins={own}")
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    other = "lightning.fabric.plugins.environments.LightningEnvironment"  # a plugin that is no CheckpointIO
    trainer = job_trainer(tmp_path, tiny_model_dir, f"--trainer.plugins={other}")
    assert isinstance(trainer.strategy.checkpoint_io, StreamingCheckpointIO)
    assert type(trainer._accelerator_connector.cluster_environment).__name__ == "LightningEnvironment"


@pytest.fixture
def bf16_hardware(monkeypatch):
    """Sets whether this (CPU-only) machine computes bf16 natively: ``bf16_hardware(True)``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return lambda native: monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)


def test_the_job_runs_in_bf16_where_the_cpu_computes_it_and_in_float32_elsewhere(tmp_path, tiny_model_dir,
                                                                                 bf16_hardware):
    for native, precision in ((True, "bf16-mixed"), (False, "32-true")):
        bf16_hardware(native)
        assert job_trainer(tmp_path, tiny_model_dir).precision == precision
        assert job_precision(None, "cpu") == (precision, None)
    # A given precision is kept; bf16 where it is emulated with a warning that says how to go faster.
    assert job_trainer(tmp_path, tiny_model_dir, "--trainer.precision=64-true").precision == "64-true"
    with pytest.warns(UserWarning, match=r"--trainer.precision=bf16-mixed on a CPU without bf16 instructions"):
        assert job_trainer(tmp_path, tiny_model_dir, "--trainer.precision=bf16-mixed").precision == "bf16-mixed"
    bf16_hardware(True)
    assert job_precision("bf16-mixed", "auto") == ("bf16-mixed", None)


def test_bf16_on_a_gpu_without_bf16_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    for native, precision in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, native=native: native)
        assert job_precision(None, "auto") == job_precision(None, "gpu") == (precision, None)
    with pytest.raises(ValueError, match=r"--trainer.precision=bf16-mixed: this GPU \(Tesla T4\) has no bf16"):
        job_precision("bf16-mixed", "auto")
    assert job_precision("16-mixed", "gpu") == ("16-mixed", None)
