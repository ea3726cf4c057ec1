"""The built wheel ships the configs: ``--config entropy.yaml`` works after a plain (non-editable) install."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(command, cwd, **kwargs):
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=True, **kwargs)


def test_the_wheel_ships_the_configs_and_the_cli_finds_them(tmp_path):
    # Build from a copy of the project, so that concurrent builds and the working tree do not interfere.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "sentinel_lightning", source / "sentinel_lightning",
                    ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), "."],
        cwd=source)
    (wheel,) = wheels.glob("sentinel_lightning-*.whl")

    # A fresh venv that sees the installed dependencies; pip comes from the system site too.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)], cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    # The venv's own copy is imported, not the editable install of this working tree.
    imported = run([str(python), "-c", "import sentinel_lightning; print(sentinel_lightning.__file__)"], cwd=elsewhere)
    location = Path(imported.stdout.strip())
    assert location.is_relative_to(venv) and not location.is_relative_to(ROOT)
    assert (location.parent / "configs" / "entropy.yaml").is_file()

    printed = run([str(venv / "bin" / "sentinel-lightning"), "fit", "--config", "entropy.yaml", "--print_config"],
                  cwd=elsewhere)
    config = yaml.safe_load(printed.stdout)
    packaged = yaml.safe_load((ROOT / "sentinel_lightning" / "configs" / "entropy.yaml").read_text())
    assert config["pruning"]["strategy"] == packaged["pruning"]["strategy"] == "entropy"
    assert config["trainer"]["limit_train_batches"] == 6
