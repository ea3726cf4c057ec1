import json
from pathlib import Path

import pytest
import yaml
from conftest import assert_job_defaults
from scripts_loader import load_script

from sentinel_lightning.cli import main
from sentinel_lightning.cli.fit import JOB_DEFAULTS, TRAINER_DEFAULTS
from sentinel_lightning.strategies import STRATEGIES


def test_script_fine_tunes_and_prunes_to_the_schedule(tmp_path):
    result = load_script("finetune_prune").main([
        "--quick", "--schedule", '{"0": 0.25, "1": 0.5}', "--epochs", "2", "--train-batches", "3",
        "--val-batches", "2", "--log-dir", str(tmp_path),
    ])
    assert result["pruned_fraction"] == 0.5 and len(result["pruned_heads"]) == 4
    assert result["val_ppl_before"] > 0 and result["val_ppl_after"] > 0
    assert Path(result["checkpoint"]).is_file()


def test_script_runs_the_cli_job_with_its_defaults(capsys):
    script = load_script("finetune_prune")
    assert script.fit_arguments([]) == []  # nothing of its own: every setting is the CLI's default
    assert script.fit_arguments(["--epochs", "3", "--train-batches", "2"]) == [
        "--trainer.max_epochs=3", "--trainer.limit_train_batches=2"
    ]
    with pytest.raises(SystemExit):
        main(["fit", *script.fit_arguments([]), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert {key: printed["trainer"][key] for key in TRAINER_DEFAULTS} == TRAINER_DEFAULTS
    assert printed["trainer"]["limit_train_batches"] == 6 and printed["trainer"]["max_epochs"] == TRAINER_DEFAULTS[
        "max_epochs"]
    assert_job_defaults(printed)


def test_help_states_the_job_defaults_and_takes_every_strategy(capsys):
    script = load_script("finetune_prune")
    for name in STRATEGIES:
        assert script.fit_arguments(["--strategy", name]) == [f"--pruning.strategy={name}"]
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"default: {JOB_DEFAULTS['pruning.strategy']}" in help_text
    assert f"default: {json.dumps(JOB_DEFAULTS['pruning.schedule'])}" in help_text


def test_quick_mode_uses_the_package_tiny_model(tmp_path):
    from sentinel_lightning.tiny import tiny_config

    script = load_script("finetune_prune")
    assert not hasattr(script, "_tiny_model")
    options = script.fit_arguments(["--quick", "--log-dir", str(tmp_path)])
    model_folder = tmp_path / script.QUICK_MODEL_FOLDER
    assert f"--model.model={model_folder}" in options and (model_folder / "config.json").is_file()
    saved = json.loads((model_folder / "config.json").read_text())
    assert saved["hidden_size"] == tiny_config("llama").hidden_size
