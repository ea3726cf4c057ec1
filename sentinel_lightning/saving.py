"""Saving and loading compacted models: config, safetensors and tokenizer, with per-layer head counts.

``save_pruned`` writes a compacted model (compacting a gated one first). A folder whose layout the config's head
counts describe (never compacted, or the uniform shape of the Llama family, see ``compaction``) is a plain
transformers folder. Any other layout (layers with different head counts, unequal key/value groups, a fully
pruned layer, GPT-2, OPT and GPT-NeoX) is saved with the modeling code it needs: ``families.py`` and
``pruned_modeling.py`` copied from ``sentinel_lightning/standalone/``, and a generated ``modeling_pruned.py`` whose
``Pruned<Class>`` rebuilds the layers; ``config.auto_map`` points ``AutoModelForCausalLM`` at it, so
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it without sentinel-lightning.

``load_pruned`` loads every such folder, rebuilding each layer's attention with the layout the config records
(``pruned_modeling.rebuild_layers``) before transformers loads the weights into it. It checks that layout first
(``check_kept_heads``) and names the layer and the field of a config that contradicts itself or the weights.

Nothing is lost or left stale. ``save_pruned`` refuses a folder that holds any file unless ``overwrite=True``, and
refuses non-finite weights or gates before writing anything. It writes into a temporary sibling folder and only
then moves the files into place, so a failed save leaves the folder as it was and a model loaded from the folder
it is saved into keeps its weights until the new ones are complete (files are replaced by rename, never rewritten
in place). With ``overwrite=True`` the model and tokenizer files of an earlier save that the new one does not
write are removed (``MODEL_FILE_PATTERNS``: weights in any format and their shards and indices, configs, tokenizer
files, remote modeling code); every other file (a README, a GGUF file, sub-folders) is kept.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from typing import Any

from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from sentinel_lightning import standalone
from sentinel_lightning.checks import describe_nonfinite, nonfinite_parameters
from sentinel_lightning.compaction import compact
from sentinel_lightning.gates import find_causal_lm, find_gates
from sentinel_lightning.standalone.families import family_of
from sentinel_lightning.standalone.pruned_modeling import (
    MODEL_TYPE_PREFIX,
    check_kept_heads,
    rebuild_layers,
    stock_describes,
)

MODELING_MODULE = "modeling_pruned"  # the generated entry module of a folder saved with modeling code
# The modules a folder saved with modeling code ships: every module of ``standalone`` (which imports nothing else).
_STANDALONE_FOLDER = os.path.dirname(standalone.__file__)
STANDALONE_FILES = tuple(
    sorted(name for name in os.listdir(_STANDALONE_FOLDER) if name.endswith(".py") and name != "__init__.py")
)
# Files and folders that a Hugging Face model or tokenizer save writes (fnmatch patterns): what an overwriting
# save_pruned removes when the new save does not write them. Other files in the folder are kept.
MODEL_FILE_PATTERNS = (
    "config.json", "generation_config.json",
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json",
    "tf_model.h5", "tf_model-*-of-*.h5", "tf_model.h5.index.json",
    "flax_model.msgpack", "flax_model-*-of-*.msgpack", "flax_model.msgpack.index.json",
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "*.tiktoken",
    "chat_template.jinja", "chat_template.json", "additional_chat_templates",
    "modeling_*.py", "configuration_*.py", "tokenization_*.py", *STANDALONE_FILES,
)
_MODELING_TEMPLATE = '''"""Written by sentinel-lightning's save_pruned: {base} with the attention layers of its config.

Loads with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``; needs torch and transformers.
The config's ``model_type`` is ``{model_type}``, not ``{base_type}``, so that plain transformers, which cannot build
these layers, asks for ``trust_remote_code`` instead of loading another model.
"""

from {base_module} import {base}
from {config_module} import {config}

from .families import FAMILIES
from .pruned_modeling import rebuild_layers, share_checkpoint_conversions

FAMILIES.setdefault("{model_type}", FAMILIES["{base_type}"])


class {config_name}({config}):
    model_type = "{model_type}"


class {name}({base}):
    """{base} whose layers keep the heads ``config.kept_heads`` records (see ``pruned_modeling``)."""

    config_class = {config_name}

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        rebuild_layers(self)


share_checkpoint_conversions({name}, {base})
'''
@contextlib.contextmanager
def _without_quantization_config(model: PreTrainedModel):
    """Hides a left-over ``quantization_config`` (a GGUF origin) of a de-quantised model while it is saved."""
    config = model.config
    if getattr(config, "quantization_config", None) is None:
        yield
        return
    quantized = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if quantized:
        raise ValueError(
            f"model holds quantised weights ({quantized[:3]}...); save_pruned saves de-quantised (floating point) "
            "models only."
        )
    saved = config.quantization_config, getattr(model, "hf_quantizer", None)
    del config.quantization_config
    model.hf_quantizer = None
    try:
        yield
    finally:
        config.quantization_config, model.hf_quantizer = saved


def save_pruned(model: nn.Module, directory: str, tokenizer=None, overwrite: bool = False) -> str:
    """Saves a pruned model (compacting it first when it still has gates) as config, safetensors and tokenizer.

    Everything is written into a temporary sibling folder first and moved into ``directory`` only when complete
    (see the module docstring), so saving into the folder the model was loaded from is safe.

    Args:
        model: A compacted model, or a gated model / LightningModule (compacted here; the input is not modified).
        directory: Folder to write into (created if missing).
        tokenizer: A tokenizer to save alongside, or None.
        overwrite: Whether to save into a folder that already holds files. The model and tokenizer files of an
            earlier save that this one does not write are then removed (``MODEL_FILE_PATTERNS``); other files
            are kept.

    Returns:
        ``directory``, which ``load_pruned`` and ``AutoModelForCausalLM.from_pretrained`` load (with
        ``trust_remote_code=True`` unless the config's head counts describe every layer; see the module docstring).

    Raises:
        FileExistsError: When ``directory`` holds files and ``overwrite`` is False.
        ValueError: When a weight or gate of ``model`` is NaN or infinite (nothing is written).
    """
    check_output_directory(directory, overwrite)
    check_finite(model, "model")
    causal_lm = find_causal_lm(model)
    if find_gates(causal_lm) is not None:
        causal_lm = compact(causal_lm)
        check_finite(causal_lm, "the compacted model")  # folding finite gates into half-precision weights can overflow
    staging = _staging_folder(directory)
    try:
        _write_model(causal_lm, staging, tokenizer)
        _move_into_place(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def check_output_directory(directory: str, overwrite: bool, option: str = "overwrite=True") -> None:
    """Refuses a ``directory`` that is a file, or a folder holding any file unless ``overwrite``.

    Args:
        directory: Where a model is to be saved.
        overwrite: Whether files already in ``directory`` may be replaced.
        option: How the error names the option that allows it (``--overwrite true`` on the command line).

    Raises:
        ValueError: When ``directory`` is empty or not a path.
        NotADirectoryError: When ``directory`` exists and is not a folder.
        FileExistsError: When ``directory`` is a folder holding files and ``overwrite`` is False; the message
            names the folder, the files found and ``option``.
    """
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory).strip():
        raise ValueError(f"directory={directory!r} must be the path of a folder to save the model into.")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"directory={directory!r} is a file, not a folder to save a model into.")
    found = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    if found and not overwrite:
        shown = ", ".join(found[:8]) + (f", ... ({len(found)} in all)" if len(found) > 8 else "")
        raise FileExistsError(
            f"directory={directory!r} is not empty ({shown}). Save into a new or empty folder, or pass {option} to "
            "replace the model in it (the model and tokenizer files of an earlier save are removed; other files "
            "are kept)."
        )


def check_finite(model: nn.Module, what: str) -> None:
    """Raises a ValueError naming the first parameters (weights or gates) of ``model`` that are NaN or infinite."""
    names = nonfinite_parameters(model)
    if names:
        raise ValueError(
            f"{what} holds {describe_nonfinite(names)}; nothing was saved. A diverged run: save an earlier or its "
            "best checkpoint."
        )


def _staging_folder(directory: str) -> str:
    """A new empty folder next to ``directory`` (same file system, so that its files move by rename)."""
    target = os.path.abspath(directory)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.saving-", dir=parent)


def _write_model(causal_lm: PreTrainedModel, folder: str, tokenizer) -> None:
    """Writes the config, the safetensors weights, the modeling code a layout needs and the tokenizer."""
    with _without_quantization_config(causal_lm):
        causal_lm.save_pretrained(folder)
    if not stock_describes(causal_lm):
        _write_modeling_code(causal_lm, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def is_model_file(name: str) -> bool:
    """Whether a file or folder name is one that a model or tokenizer save writes (``MODEL_FILE_PATTERNS``)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_FILE_PATTERNS)


def _move_into_place(staging: str, directory: str) -> None:
    """Moves the files of a complete save from ``staging`` into ``directory``, then removes the stale ones.

    Files are replaced by rename: a model whose weights are memory-mapped from the old files keeps them.
    """
    os.makedirs(directory, exist_ok=True)
    written = set(os.listdir(staging))
    for name in sorted(written):
        target = os.path.join(directory, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    for name in sorted(set(os.listdir(directory)) - written):
        path = os.path.join(directory, name)
        if not is_model_file(name):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _write_modeling_code(model: PreTrainedModel, directory: str) -> None:
    """Copies the standalone modules into ``directory``, writes ``modeling_pruned.py`` and points the config at it.

    ``from_pretrained(..., trust_remote_code=True)`` then imports ``modeling_pruned.py``, which transformers copies
    together with the files it imports relatively (``pruned_modeling.py``, and ``families.py`` through it).
    """
    for name in STANDALONE_FILES:
        shutil.copyfile(os.path.join(_STANDALONE_FOLDER, name), os.path.join(directory, name))
    config_class = type(model.config)
    base = _causal_lm_class(config_class)
    name, config_name = f"Pruned{base.__name__}", f"Pruned{config_class.__name__}"
    base_type = config_class.model_type
    model_type = MODEL_TYPE_PREFIX + base_type
    code = _MODELING_TEMPLATE.format(
        base=base.__name__, base_module=base.__module__, name=name, config=config_class.__name__,
        config_module=config_class.__module__, config_name=config_name, model_type=model_type, base_type=base_type,
    )
    with open(os.path.join(directory, f"{MODELING_MODULE}.py"), "w", encoding="utf-8") as file:
        file.write(code)
    config_path = os.path.join(directory, "config.json")
    with open(config_path, encoding="utf-8") as file:
        config = json.load(file)
    config["model_type"] = model_type
    config["auto_map"] = {
        **config.get("auto_map", {}),
        "AutoConfig": f"{MODELING_MODULE}.{config_name}",
        "AutoModelForCausalLM": f"{MODELING_MODULE}.{name}",
    }
    with open(config_path, "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2, sort_keys=True)
        file.write("\n")


def needs_modeling_code(directory: str) -> bool:
    """Whether ``directory`` holds a model folder that only its own modeling code builds (see ``save_pruned``):
    its ``config.json`` has a ``model_type`` of sentinel-lightning's own."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as file:
        config = json.load(file)
    return str(config.get("model_type", "")).startswith(MODEL_TYPE_PREFIX)


def _read_config(directory: str) -> PretrainedConfig:
    """The config of a saved folder, as the family's own config class (a ``sentinel_<family>`` type read as
    ``<family>``), without running the folder's code."""
    config_dict, _ = PretrainedConfig.get_config_dict(directory)
    model_type = str(config_dict.get("model_type", ""))
    if model_type.startswith(MODEL_TYPE_PREFIX):
        base_type = model_type[len(MODEL_TYPE_PREFIX):]
        if base_type not in CONFIG_MAPPING:
            raise ValueError(f"{directory!r}: config.model_type={model_type!r} names no family transformers knows.")
        config_dict = {**config_dict, "model_type": base_type}
        config_dict.pop("auto_map", None)
        return CONFIG_MAPPING[base_type].from_dict(config_dict)
    return AutoConfig.from_pretrained(directory)


def _causal_lm_class(config_class: type) -> type[PreTrainedModel]:
    """The transformers causal LM class of a config class (e.g. ``LlamaForCausalLM`` for ``LlamaConfig``)."""
    if config_class not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"A {config_class.__name__} is not the config of a causal LM that transformers knows.")
    return MODEL_FOR_CAUSAL_LM_MAPPING[config_class]


def load_pruned(directory: str, **kwargs: Any) -> PreTrainedModel:
    """Loads a model written by ``save_pruned``, with its per-layer head counts.

    Transformers' own ``from_pretrained`` does the loading (key renaming, tied weights, dtype, device map), for a
    model whose layers are given the head counts in ``config.kept_heads`` before the weights arrive.

    Args:
        directory: Folder holding ``config.json`` and the safetensors weights.
        **kwargs: Passed to ``from_pretrained`` (e.g. ``attn_implementation="eager"``, ``dtype=torch.bfloat16``).

    Returns:
        The model, an instance of its ordinary class, in eval mode.

    Raises:
        ValueError: When the config's recorded layout is malformed (``check_kept_heads``), or the weights do not
            fit it (the message names the layer, its recorded heads and the weight's shapes).
    """
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"directory={directory!r} has no config.json; save the model with save_pruned.")
    config = _read_config(directory)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"directory={directory!r} holds a {type(config).__name__}, which is not a causal LM config.")
    where = os.path.join(directory, "config.json")
    if needs_modeling_code(directory) and getattr(config, "kept_heads", None) is None:
        raise ValueError(
            f"{where}: config.kept_heads is missing or null, but the folder needs its modeling code: a compacted "
            "model's config records the kept query heads of every layer (a list of lists of head indices). Save the "
            "model again with save_pruned."
        )
    check_kept_heads(config, where=where)
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]

    def __init__(self, config, *args, **kwargs) -> None:
        base.__init__(self, config, *args, **kwargs)
        rebuild_layers(self)  # the kept heads' shapes, before from_pretrained loads the weights into it

    # Named like the base class, which is how transformers finds the family's checkpoint key renamings.
    pruned_class = type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})
    kwargs["ignore_mismatched_sizes"] = True  # reported below, per layer, instead of transformers' generic error
    model, info = pruned_class.from_pretrained(directory, config=config, output_loading_info=True, **kwargs)
    if info.get("mismatched_keys"):
        raise ValueError(_mismatch_message(directory, model, info["mismatched_keys"]))
    problems = {key: sorted(value) for key, value in info.items() if key != "error_msgs" and value}
    if problems or info.get("error_msgs"):
        errors = info.get("error_msgs") or ""
        raise ValueError(f"The weights in {directory!r} do not fit its config: {problems} {errors}")
    model.__class__ = base  # an ordinary model again, which saves as its own architecture
    return model.eval()


def _mismatch_message(directory: str, model: PreTrainedModel, mismatched) -> str:
    """Says, layer by layer, which weights have other shapes than the heads the config records for that layer."""
    config = model.config
    names = {id(module): name for name, module in model.named_modules()}
    prefixes = [names[id(layer)] + "." for layer in family_of(model).decoder_layers(model)]
    by_layer: dict[int | None, list[str]] = {}
    for key, in_file, expected in sorted(mismatched, key=lambda item: item[0]):
        layer = next((index for index, prefix in enumerate(prefixes) if key.startswith(prefix)), None)
        short = key[len(prefixes[layer]):] if layer is not None else key
        shapes = f"{short} is {list(in_file)} in the weights, {list(expected)} by the config"
        by_layer.setdefault(layer, []).append(shapes)
    kv_heads = getattr(config, "kept_key_value_heads", None)
    parts = []
    for layer, shapes in by_layer.items():
        if layer is None:
            parts.append(f"outside the decoder layers: {', '.join(shapes)}")
            continue
        kept = getattr(config, "kept_heads", None)
        recorded = f"config.kept_heads[{layer}] = {kept[layer]}" if kept else "config.kept_heads missing or null"
        if kv_heads is not None:
            recorded += f", config.kept_key_value_heads[{layer}] = {kv_heads[layer]}"
        parts.append(f"layer {layer} ({recorded}): {', '.join(shapes)}")
    return (
        f"The weights in {directory!r} do not fit the heads its config.json records: {'; '.join(parts)}. Its "
        "kept_heads, kept_key_value_heads or key_value_index were edited or belong to another model; save the "
        "model again with save_pruned."
    )
