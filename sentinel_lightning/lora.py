"""LoRA fine-tunes: ``peft`` adapters on a gated model, and merging them exactly before compaction.

``peft`` is an optional dependency (``pip install "sentinel-lightning[lora]"``), imported only when used.

Two things make adapters and gates meet correctly:

- **Hook placement**: a gate scales the input of its layer's output projection. When LoRA wraps that projection
  (``target_modules`` holding ``o_proj``), the gate must sit on the wrapper, whose input feeds both the frozen
  base layer and the adapter; ``add_lora`` and ``merge_adapters`` re-hook the gates onto whatever module is the
  output projection after peft replaced it (``rehook_gates``).
- **Compaction**: ``compaction.compact`` cuts the weights of plain projections; it first merges every adapter
  into its base weight (``W + B A * scaling``, peft's own merge) on a copy (``merge_adapters``), so the compacted
  model computes what the gated LoRA model computes.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from sentinel_lightning.gates import _GateHook, attach_gates, detach_gates, find_causal_lm, find_gates
from sentinel_lightning.standalone.families import output_projections


def _peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            "LoRA needs peft: pip install 'sentinel-lightning[lora]' (or pip install 'peft>=0.21')."
        ) from error
    return peft


def lora_config(lora: Any):
    """A ``peft.LoraConfig`` from ``lora``: a ``LoraConfig`` (returned as it is) or a dict of its arguments.

    ``task_type`` defaults to ``"CAUSAL_LM"``. An unknown argument or a value peft refuses raises a ``ValueError``
    naming ``lora``.
    """
    peft = _peft()
    if isinstance(lora, peft.LoraConfig):
        return lora
    if not isinstance(lora, dict):
        raise ValueError(f"lora={lora!r} must be None, a dict of peft.LoraConfig arguments or a peft.LoraConfig.")
    try:
        return peft.LoraConfig(**{"task_type": "CAUSAL_LM", **lora})
    except (TypeError, ValueError) as error:
        raise ValueError(f"lora={lora!r} is not a valid peft.LoraConfig: {error}") from error


def add_lora(model: nn.Module, lora: Any) -> nn.Module:
    """Wraps a causal LM in LoRA adapters (``peft.get_peft_model``): every base weight frozen, adapters trainable.

    Gates already attached to ``model`` are moved onto the projections peft wrapped (``rehook_gates``).

    Args:
        model: A Hugging Face causal LM of a supported family.
        lora: A ``peft.LoraConfig`` or a dict of its arguments (``lora_config``).

    Returns:
        The ``peft.PeftModel``; ``gates.find_causal_lm`` finds the wrapped causal LM inside it.
    """
    peft_model = _peft().get_peft_model(model, lora_config(lora))
    rehook_gates(find_causal_lm(peft_model))
    return peft_model


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds peft tuner layers (adapters not merged yet)."""
    import sys

    if "peft" not in sys.modules:  # nothing can hold peft layers if peft was never imported
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def gates_hooked(model: nn.Module) -> bool:
    """Whether the gates of ``model`` (a causal LM) act on its current output projections.

    False after ``peft``'s ``merge_and_unload`` replaced a projection the gates were hooked on: the model then
    computes as if those layers had no gates.
    """
    gates = find_gates(model)
    if gates is None:
        return True
    return all(
        any(isinstance(hook, _GateHook) and hook.gates is gates for hook in projection._forward_pre_hooks.values())
        for projection in output_projections(model)
    )


def rehook_gates(model: nn.Module) -> None:
    """Re-registers the gates of ``model`` (a causal LM) on its current output projections, their state kept."""
    gates = find_gates(model)
    if gates is None:
        return
    state, learns = gates.state_dict(), gates.values.requires_grad
    detach_gates(model)
    gates = attach_gates(model)
    gates.load_state_dict(state)
    gates.values.requires_grad_(learns)


def merge_adapters(model: nn.Module) -> nn.Module:
    """The causal LM inside ``model`` with every LoRA adapter merged into its base weights, gates re-hooked.

    Returns the causal LM itself when it has no adapters and its gates are hooked; otherwise a copy (``model``
    is not modified, except that hook handles left dead by a ``merge_and_unload`` are dropped from its gates):
    a ``peft.PeftModel`` inside ``model`` is merged with ``merge_and_unload(safe_merge=True)``, tuner layers
    injected without one with their own ``merge``.

    Args:
        model: A gated causal LM, a ``peft.PeftModel`` of one, or a LightningModule holding either.
    """
    causal_lm = find_causal_lm(model)
    gates = find_gates(causal_lm)
    if gates is not None:  # handles on modules merge_and_unload replaced: deepcopy cannot copy them
        gates._hook_handles = [handle for handle in gates._hook_handles if handle.hooks_dict_ref() is not None]
    if not has_adapters(causal_lm):
        if gates_hooked(causal_lm):
            return causal_lm
        merged = copy.deepcopy(causal_lm)
    else:
        peft = _peft()
        peft_model = next((module for module in model.modules() if isinstance(module, peft.PeftModel)), None)
        if peft_model is not None and find_causal_lm(peft_model) is causal_lm:
            merged = copy.deepcopy(peft_model).merge_and_unload(safe_merge=True)
        else:
            merged = copy.deepcopy(causal_lm)
            _merge_tuner_layers(merged)
    rehook_gates(merged)
    return merged


def _merge_tuner_layers(model: nn.Module) -> None:
    """Merges every peft tuner layer of ``model`` into its base layer and puts the base layer in its place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
