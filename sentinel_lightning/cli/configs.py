"""The YAML configs shipped inside the package, and ``--config`` values that name them.

``sentinel-lightning fit --config entropy.yaml`` (or ``--config entropy``, or a path such as
``--config configs/entropy.yaml`` that is no file here) works from any folder after a plain ``pip install``: a
``--config`` value that is not an existing file is read as the name of a packaged config.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

YAML_SUFFIXES = (".yaml", ".yml")


def packaged_configs() -> dict[str, Path]:
    """The configs shipped in ``sentinel_lightning/configs``: ``{name without suffix: path}``, sorted by name."""
    folder = Path(str(resources.files("sentinel_lightning") / "configs"))
    return {path.stem: path for path in sorted(folder.iterdir()) if path.suffix in YAML_SUFFIXES}


def resolve_config(value: str) -> str:
    """The path ``--config value`` reads: ``value`` itself when it is a file or inline YAML, else a packaged config.

    Raises:
        ValueError: ``value`` is neither a file, nor inline YAML, nor the name of a packaged config.
    """
    if os.path.isfile(value) or any(mark in value for mark in (":", "\n", "{")):
        return value
    path = Path(value)
    name = path.stem if path.suffix in YAML_SUFFIXES else path.name
    configs = packaged_configs()
    if name in configs:
        return str(configs[name])
    names = ", ".join(f"{stem}{configs[stem].suffix}" for stem in configs)
    raise ValueError(
        f"--config={value!r} is neither a file nor a packaged config; give the path of a YAML file or one of the "
        f"packaged configs: {names}."
    )


def resolve_config_arguments(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config VALUE`` / ``--config=VALUE`` resolved by ``resolve_config``."""
    resolved, previous = [], None
    for argument in argv:
        if previous == "--config":
            argument = resolve_config(argument)
        elif argument.startswith("--config="):
            argument = "--config=" + resolve_config(argument.removeprefix("--config="))
        resolved.append(argument)
        previous = argument
    return resolved
