"""Saving and loading compacted models: config, safetensors and tokenizer, with per-layer head counts.

``save_pruned`` writes a compacted model (compacting a gated one first). A folder whose layout the config's head
counts describe (never compacted, or the uniform shape of the Llama family, see ``compaction``) is a plain
transformers folder. Any other layout (layers with different head counts, unequal key/value groups, a fully
pruned layer, GPT-2, OPT and GPT-NeoX) is saved with the modeling code it needs: ``families.py`` and
``pruned_modeling.py`` copied from this package, and a generated ``modeling_pruned.py`` whose
``Pruned<Class>`` rebuilds the layers; ``config.auto_map`` points ``AutoModelForCausalLM`` at it, so
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it without sentinel-lightning.

``load_pruned`` loads every such folder, rebuilding each layer's attention with the layout the config records
(``pruned_modeling.rebuild_layers``) before transformers loads the weights into it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any

from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from sentinel_lightning import families, pruned_modeling
from sentinel_lightning.compaction import compact
from sentinel_lightning.gates import find_causal_lm, find_gates
from sentinel_lightning.pruned_modeling import rebuild_layers, stock_describes

MODELING_MODULE = "modeling_pruned"  # the generated entry module of a folder saved with modeling code
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


def save_pruned(model: nn.Module, directory: str, tokenizer=None) -> str:
    """Saves a pruned model (compacting it first when it still has gates) as config, safetensors and tokenizer.

    Args:
        model: A compacted model, or a gated model / LightningModule (compacted here; the input is not modified).
        directory: Folder to write into (created if missing).
        tokenizer: A tokenizer to save alongside, or None.

    Returns:
        ``directory``, which ``load_pruned`` and ``AutoModelForCausalLM.from_pretrained`` load (with
        ``trust_remote_code=True`` unless the config's head counts describe every layer; see the module docstring).
    """
    causal_lm = find_causal_lm(model)
    if find_gates(causal_lm) is not None:
        causal_lm = compact(causal_lm)
    os.makedirs(directory, exist_ok=True)
    with _without_quantization_config(causal_lm):
        causal_lm.save_pretrained(directory)
    if not stock_describes(causal_lm):
        _write_modeling_code(causal_lm, directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


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
    """
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"directory={directory!r} has no config.json; save the model with save_pruned.")
    config = AutoConfig.from_pretrained(directory)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"directory={directory!r} holds a {type(config).__name__}, which is not a causal LM config.")
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]

    def __init__(self, config, *args, **kwargs) -> None:
        base.__init__(self, config, *args, **kwargs)
        rebuild_layers(self)  # the kept heads' shapes, before from_pretrained loads the weights into them

    # Named like the base class, which is how transformers finds the family's checkpoint key renamings.
    pruned_class = type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})
    model, info = pruned_class.from_pretrained(directory, config=config, output_loading_info=True, **kwargs)
    problems = {key: sorted(value) for key, value in info.items() if key != "error_msgs" and value}
    if problems or info.get("error_msgs"):
        errors = info.get("error_msgs") or ""
        raise ValueError(f"The weights in {directory!r} do not fit its config: {problems} {errors}")
    model.__class__ = base  # an ordinary model again, which saves as its own architecture
    return model.eval()
