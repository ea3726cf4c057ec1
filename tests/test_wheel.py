"""The built wheel ships the configs: ``--config entropy.yaml`` works after a plain (non-editable) install."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(command, cwd, **kwargs):
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=True, **kwargs)


def see_site_packages_of_this_environment(python: Path) -> None:
    """Makes the venv of ``python`` see the packages of the environment running the tests (pip among them).

    ``venv --system-site-packages`` would show the base interpreter's packages, which are not this environment's
    when the tests run inside a virtual environment. A ``.pth`` file of the venv adds this environment's site
    folders after the venv's own, with their ``.pth`` files, as the system site would be added.
    """
    folders = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    venv_site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=python.parent)
    lines = [f"import site; site.addsitedir({folder!r})" for folder in folders if os.path.isdir(folder)]
    (Path(venv_site.stdout.strip()) / "environment_under_test.pth").write_text("\n".join(lines) + "\n")


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

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    see_site_packages_of_this_environment(python)
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)], cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    # The dependencies are this environment's (a virtual one's too, not its base interpreter's) ...
    torch_file = run([str(python), "-c", "import torch; print(torch.__file__)"], cwd=elsewhere).stdout.strip()
    assert os.path.realpath(torch_file) == os.path.realpath(torch.__file__)
    # ... but the venv's own copy of the package is imported, not the editable install of this working tree.
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
