"""Saving and loading compacted models: config, safetensors and tokenizer, with per-layer head counts.

``save_pruned`` writes a compacted model (compacting a gated one first). A folder whose layout the config's head
counts describe (never compacted, or the uniform shape of the Llama family, see ``compaction``) is a plain
transformers folder. Any other layout (layers with different head counts, unequal key/value groups, a fully
pruned layer, GPT-2, OPT and GPT-NeoX) is saved with the modeling code it needs: ``families.py`` and
``pruned_modeling.py`` copied from this package, and a generated ``modeling_pruned.py`` whose
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
import itertools
import json
import os
import shutil
import tempfile
from typing import Any

from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from sentinel_lightning import families, pruned_modeling
from sentinel_lightning.checks import describe_nonfinite, nonfinite_parameters
from sentinel_lightning.compaction import compact
from sentinel_lightning.gates import find_causal_lm, find_gates
from sentinel_lightning.pruned_modeling import rebuild_layers, stock_describes

MODELING_MODULE = "modeling_pruned"  # the generated entry module of a folder saved with modeling code
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
    "modeling_*.py", "configuration_*.py", "tokenization_*.py", "families.py", "pruned_modeling.py",
)
_MODELING_TEMPLATE = '''"""Written by sentinel-lightning's save_pruned: {base} with the attention layers of its config.

Loads with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``; needs torch and transformers.
"""

from {base_module} import {base}

from .pruned_modeling import rebuild_layers, share_checkpoint_conversions


class {name}({base}):
    """{base} whose layers keep the heads ``config.kept_heads`` records (see ``pruned_modeling``)."""

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
        NotADirectoryError: When ``directory`` exists and is not a folder.
        FileExistsError: When ``directory`` is a folder holding files and ``overwrite`` is False; the message
            names the folder, the files found and ``option``.
    """
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
    for module in (families, pruned_modeling):
        shutil.copyfile(module.__file__, os.path.join(directory, os.path.basename(module.__file__)))
    base = _causal_lm_class(type(model.config))
    name = f"Pruned{base.__name__}"
    code = _MODELING_TEMPLATE.format(base=base.__name__, base_module=base.__module__, name=name)
    with open(os.path.join(directory, f"{MODELING_MODULE}.py"), "w", encoding="utf-8") as file:
        file.write(code)
    config_path = os.path.join(directory, "config.json")
    with open(config_path, encoding="utf-8") as file:
        config = json.load(file)
    config["auto_map"] = {**config.get("auto_map", {}), "AutoModelForCausalLM": f"{MODELING_MODULE}.{name}"}
    with open(config_path, "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2, sort_keys=True)
        file.write("\n")


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
    config = AutoConfig.from_pretrained(directory)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"directory={directory!r} holds a {type(config).__name__}, which is not a causal LM config.")
    check_kept_heads(config, where=os.path.join(directory, "config.json"))
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
    prefixes = [names[id(layer)] + "." for layer in families.family_of(model).decoder_layers(model)]
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
        recorded = f"config.kept_heads[{layer}] = {config.kept_heads[layer]}"
        if kv_heads is not None:
            recorded += f", config.kept_key_value_heads[{layer}] = {kv_heads[layer]}"
        parts.append(f"layer {layer} ({recorded}): {', '.join(shapes)}")
    return (
        f"The weights in {directory!r} do not fit the heads its config.json records: {'; '.join(parts)}. Its "
        "kept_heads, kept_key_value_heads or key_value_index were edited or belong to another model; save the "
        "model again with save_pruned."
    )


def check_kept_heads(config, where: str = "config") -> None:
    """Checks the layout a compacted config records before a model is built from it (nothing to check if none).

    ``kept_heads`` must hold one list per decoder layer of distinct original query head indices in ``[0, H)``
    (ascending, except where merged key/value heads group their readers); ``kept_key_value_heads`` likewise of
    key/value head indices in ``[0, K)`` (increasing with repeats in folders saved before ``key_value_index``
    existed); ``key_value_index[l]`` one position in
    ``range(len(kept_key_value_heads[l]))`` per kept query head (the identity without grouped-query attention).
    ``H`` and ``K`` are the config's head counts, except after a rewrite to the uniform shape (see ``compaction``
    and ``_records_original_heads``): the config no longer records them, and indices are only checked to be
    non-negative. Whether the weights fit the layout is checked when they are loaded.

    Args:
        config: A causal LM config.
        where: The file the config came from, for the messages.

    Raises:
        ValueError: Naming the field, the layer and the bad value.
    """
    kept_heads = getattr(config, "kept_heads", None)
    if kept_heads is None:
        return
    num_layers = config.num_hidden_layers
    family = families.FAMILIES.get(config.model_type)
    grouped = family.grouped_query if family is not None else hasattr(config, "num_key_value_heads")
    num_heads = config.num_attention_heads
    num_kv_heads = (getattr(config, "num_key_value_heads", None) or num_heads) if grouped else num_heads
    bounds = (num_heads, num_kv_heads) if _records_original_heads(config, family) else (None, None)
    # Distinct, in the order the weights hold them: merged key/value heads group their readers (``merging``).
    _check_layers(where, "kept_heads", kept_heads, num_layers, bounds[0], order="distinct")
    kv_heads = getattr(config, "kept_key_value_heads", None)
    kv_index = getattr(config, "key_value_index", None)
    if kv_heads is not None:
        order = "distinct" if kv_index is not None else "increasing"  # repeats: before key_value_index
        _check_layers(where, "kept_key_value_heads", kv_heads, num_layers, bounds[1], order)
        differ = [layer for layer, (kv, heads) in enumerate(zip(kv_heads, kept_heads)) if kv != heads]
        if not grouped and differ:
            layer = differ[0]
            raise ValueError(
                f"{where}: config.kept_key_value_heads[{layer}] = {kv_heads[layer]} must equal config.kept_heads"
                f"[{layer}] = {kept_heads[layer]} (layer {layer}): model_type={config.model_type!r} has one key/value "
                "head per query head."
            )
    if kv_index is not None:
        kv_heads = kv_heads if kv_heads is not None else kept_heads
        _check_layers(where, "key_value_index", kv_index, num_layers, None, order=None)
        for layer, (index, heads, kv) in enumerate(zip(kv_index, kept_heads, kv_heads)):
            _check_key_value_index(where, layer, index, len(heads), len(kv), grouped)


def _records_original_heads(config, family) -> bool:
    """Whether ``config``'s head counts are the original model's (never rewritten to a uniform shape).

    Only families whose config states ``head_dim`` are rewritten, and a rewritten config has fewer heads than its
    width holds (``num_attention_heads * head_dim < hidden_size``). A model that was like that from the start (an
    explicit ``head_dim``) is treated alike: its indices are then only checked to be non-negative.
    """
    if family is not None and not family.config_has_head_dim:
        return True
    head_dim = getattr(config, "head_dim", None)
    return head_dim is None or config.num_attention_heads * head_dim == config.hidden_size


def _check_layers(where: str, field: str, value, num_layers: int, bound: int | None, order: str | None) -> None:
    """Checks that ``config.<field>`` is a list of ``num_layers`` lists of ints in ``[0, bound)`` (any int >= 0
    when ``bound`` is None), in ``order`` (``"distinct"``, ``"increasing"``, or None for any)."""
    if not isinstance(value, list) or not all(isinstance(layer, list) for layer in value):
        raise ValueError(
            f"{where}: config.{field} = {value!r} must be a list holding one list of head indices per decoder layer."
        )
    if len(value) != num_layers:
        raise ValueError(
            f"{where}: config.{field} has {len(value)} layers; the config has num_hidden_layers={num_layers}."
        )
    allowed = f"[0, {bound})" if bound is not None else "[0, ...)"
    for layer, indices in enumerate(value):
        bad = [i for i in indices if type(i) is not int or i < 0 or (bound is not None and i >= bound)]
        if bad:
            raise ValueError(
                f"{where}: config.{field}[{layer}] = {indices} holds {bad[0]!r}, not a head index in {allowed} "
                f"(layer {layer})."
            )
        wrong = len(set(indices)) < len(indices) if order == "distinct" else order and any(
            a > b for a, b in itertools.pairwise(indices))
        if wrong:
            raise ValueError(f"{where}: config.{field}[{layer}] = {indices} must be {order} (layer {layer}).")


def _check_key_value_index(where: str, layer: int, index: list, num_heads: int, num_kv: int, grouped: bool) -> None:
    """Checks layer ``layer``'s ``key_value_index``: ``num_heads`` positions that read all ``num_kv`` kept heads."""
    expected = list(range(num_heads)) if not grouped else None
    if len(index) != num_heads or sorted(set(index)) != list(range(num_kv)) or expected not in (None, index):
        allowed = f"{expected}" if expected is not None else f"{num_heads} positions covering range({num_kv})"
        raise ValueError(
            f"{where}: config.key_value_index[{layer}] = {index} does not fit layer {layer}'s {num_heads} kept query "
            f"heads and {num_kv} kept key/value heads (allowed: {allowed})."
        )
