"""Writing a causal LM of the Llama family (plain or compacted) as one GGUF file that llama.cpp runs.

``write_gguf`` writes the weights in float32 with the ``gguf`` package and, with ``quantize``, hands the file to
llama.cpp's own quantizer (``llama_cpp.llama_model_quantize``, from ``llama-cpp-python``). What llama.cpp is told
depends on the layout of the compacted model (``config.kept_heads``, ``config.kept_key_value_heads`` and
``config.key_value_index``, see ``compaction``):

- **Every layer the same shape** (a plain model, ``scope="uniform"``): the ``llama`` architecture, the family's own,
  with one head count and one key/value head count.
- **Layers of different sizes**: the ``deci`` architecture (DeciLM / Llama-Nemotron), whose graph reads a head
  count and a key/value head count per layer (``attention.head_count`` / ``head_count_kv`` as arrays; llama.cpp's
  ``llama`` graph takes layer 0's counts for every layer). A layer with no attention (``families.EmptyAttention``)
  has ``head_count`` 0 there and is skipped by the graph, except layer 0 (llama.cpp reads the head size off it)
  and a layer whose ``EmptyAttention`` adds a bias, which get one all-zero head: its value is 0, so the layer
  adds exactly ``attn_output.bias``.
- **Unequal groups in a layer** (key/value heads read by different numbers of query heads): llama.cpp maps query
  head ``s`` onto key/value head ``s // g`` with one ``g`` per layer, so the layer's ``k`` key/value heads get
  ``k * g_max`` query slots; padding slots have zero rows in ``attn_q`` and zero columns in ``attn_output``: a zero
  query attends uniformly, and its zero output columns make it add exactly nothing. The key/value cache is the
  compacted model's; only query compute grows.

Rotary embeddings: Hugging Face rotates the two halves of each head, llama.cpp adjacent pairs, so the rows of
``attn_q`` and ``attn_k`` are permuted within each head (as llama.cpp's ``convert_hf_to_gguf.py`` does). The output
biases that output compensation adds (``attention_bias``) are written as ``attn_output.bias``, which both graphs
add; zero query/key/value biases are left out.

Tokenizer: a model that came from a GGUF file (the embedded default) gets every ``tokenizer.*`` key of that file
(vocabulary, merges, special tokens, chat template) with ``tokenizer_gguf``; a Hugging Face fast byte-level BPE
tokenizer is written from its vocabulary, merges, special tokens and chat template with ``tokenizer``, its
pre-tokenizer named by ``tokenizer_pre`` (read off the tokenizer for GPT-2's own); without
either (or for a BPE without merges, which llama.cpp cannot load) the file has a vocabulary of ``vocab_size``
placeholder tokens: llama.cpp then runs token ids, not text.

Notation: ``C`` hidden size, ``D`` head dim, ``h`` kept query heads, ``k`` kept key/value heads of a layer.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# --quantize names -> llama.cpp's file types (llama_cpp.LLAMA_FTYPE_MOSTLY_<NAME>)
QUANTIZATIONS = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1",
                 "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")
INSTALL_HINT = 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python'


@dataclass(frozen=True)
class LayerLayout:
    """How one decoder layer is described to llama.cpp.

    Attributes:
        num_heads: Query head slots llama.cpp computes (``k * g_max``; 0 for a layer without attention).
        num_kv_heads: Key/value heads (``k``).
        query_slots: The slot of each kept query head, ``h`` of them; the other slots are zero padding.
        zero_head: Whether the layer is one all-zero head standing for a layer without attention.
    """

    num_heads: int
    num_kv_heads: int
    query_slots: tuple[int, ...]
    zero_head: bool = False

    @property
    def padding(self) -> int:
        """Query slots that hold no kept head."""
        return 0 if self.zero_head else self.num_heads - len(self.query_slots)


def check_quantize(quantize: str | None) -> str | None:
    """``quantize`` in lower case, or None for float32; raises a ``ValueError`` naming the allowed values."""
    if quantize is None or quantize.lower() in ("f32", "none"):
        return None
    if quantize.lower() not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is not a llama.cpp type this export writes; choose f32 or one of "
                         f"{', '.join(QUANTIZATIONS)}.")
    return quantize.lower()


def layer_layouts(model: PreTrainedModel, output_biases: list[torch.Tensor | None] | None = None) -> list[LayerLayout]:
    """Each layer's ``LayerLayout``, from the compacted model's ``config.key_value_index`` (or the plain config).

    Args:
        model: A plain or compacted model of a supported family.
        output_biases: Each layer's attention output bias ``[C]`` or None (an empty layer with a non-zero one gets
            a zero head).
    """
    config = model.config
    kv_indices = getattr(config, "key_value_index", None)
    if kv_indices is None:
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        return [LayerLayout(num_heads, num_kv_heads, tuple(range(num_heads)))] * config.num_hidden_layers
    layouts = []
    for index, kv_index in enumerate(kv_indices):
        if not kv_index:
            bias = None if output_biases is None else output_biases[index]
            keeps_bias = bias is not None and bool(bias.any())
            layouts.append(LayerLayout(1, 1, (), True) if index == 0 or keeps_bias else LayerLayout(0, 0, ()))
            continue
        num_kv_heads = len(set(kv_index))
        group = max(Counter(kv_index).values())
        seen: Counter = Counter()
        slots = []
        for kv_head in kv_index:
            slots.append(kv_head * group + seen[kv_head])
            seen[kv_head] += 1
        layouts.append(LayerLayout(num_kv_heads * group, num_kv_heads, tuple(slots)))
    return layouts


def architecture_of(layouts: list[LayerLayout]) -> str:
    """``"llama"`` when every layer has the same head counts, else ``"deci"`` (per-layer head counts)."""
    return "llama" if len({(layout.num_heads, layout.num_kv_heads) for layout in layouts}) == 1 else "deci"


def write_gguf(
    model: PreTrainedModel,
    path: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    tokenizer_gguf: str | None = None,
    quantize: str | None = None,
    overwrite: bool = False,
    tokenizer_pre: str | None = None,
) -> dict:
    """Writes ``model`` as one GGUF file at ``path`` that llama.cpp runs (see the module docstring).

    Args:
        model: A plain or compacted (``compact``) causal LM of the Llama family (``LlamaForCausalLM``,
            ``MistralForCausalLM`` without a sliding window). A gated model is compacted first.
        path: The ``.gguf`` file to write; refused when it exists, unless ``overwrite``.
        tokenizer: A Hugging Face fast byte-level BPE tokenizer to write (used when ``tokenizer_gguf`` is None).
        tokenizer_gguf: A GGUF file whose ``tokenizer.*`` keys are copied (the file the model came from).
        quantize: None or ``"f32"`` for float32, else one of ``QUANTIZATIONS`` (llama.cpp's quantizer, which
            needs ``llama-cpp-python``).
        overwrite: Whether to replace an existing ``path``.
        tokenizer_pre: llama.cpp's name of ``tokenizer``'s pre-tokenizer (``tokenizer.ggml.pre``: ``"llama3"``,
            ``"qwen2"``, ``"smollm"``, ...); read off the tokenizer when None, which works for GPT-2's
            (a plain ``ByteLevel`` pre-tokenizer with its regex, ``"gpt-2"``) and is refused for others.

    Returns:
        ``{"path", "architecture", "file_type", "file_bytes", "tokenizer", "num_heads", "num_kv_heads",
        "padding_heads"}``: the last three per layer, as written.
    """
    quantize = check_quantize(quantize)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"path={path!r} exists; pass overwrite=True (--overwrite true) to replace it.")
    model = _compacted(model)
    _check_supported(model)
    if quantize is not None:
        _llama_cpp()  # fail before writing anything when the quantizer is missing
    tensors, layouts = _tensors(model)
    arch = architecture_of(layouts)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    float_path = path if quantize is None else tempfile.mkstemp(suffix=".f32.gguf", dir=folder)[1]
    try:
        writer = gguf.GGUFWriter(float_path, arch)
        _write_parameters(writer, model, layouts, arch)
        tokenizer_kind = _write_tokenizer(writer, model, tokenizer, tokenizer_gguf, tokenizer_pre)
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if quantize is not None:
            quantize_gguf(float_path, path, quantize)
    finally:
        if quantize is not None and os.path.exists(float_path):
            os.remove(float_path)
    return {
        "path": path, "architecture": arch, "file_type": quantize or "f32", "file_bytes": os.path.getsize(path),
        "tokenizer": tokenizer_kind, "num_heads": [layout.num_heads for layout in layouts],
        "num_kv_heads": [layout.num_kv_heads for layout in layouts],
        "padding_heads": [layout.padding for layout in layouts],
    }


def quantize_gguf(source: str, destination: str, quantize: str) -> None:
    """Quantises the GGUF file ``source`` into ``destination`` with llama.cpp's quantizer (``llama-cpp-python``)."""
    quantize = check_quantize(quantize)
    if quantize is None:
        raise ValueError("quantize='f32' is not a quantisation; write the float32 file with write_gguf instead.")
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quantize.upper()}")
    status = llama_cpp.llama_model_quantize(source.encode(), destination.encode(), params)
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantise {source!r} to {quantize} (status {status}).")


# ----------------------------------------------------------------------------------------------------------------
# Checks


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as error:
        raise ImportError(f"Quantised GGUF output uses llama.cpp's quantizer: install it with `{INSTALL_HINT}` "
                          "(the flag avoids a native build whose quantised kernels crash on some CPUs).") from error
    return llama_cpp


def _compacted(model) -> PreTrainedModel:
    from sentinel_lightning.compaction import compact
    from sentinel_lightning.gates import find_causal_lm, find_gates

    causal_lm = find_causal_lm(model)
    return compact(causal_lm) if find_gates(causal_lm) is not None else causal_lm


def _check_supported(model: PreTrainedModel) -> None:
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"GGUF export writes the Llama family ({', '.join(SUPPORTED_MODEL_TYPES)}); this model is "
                         f"model_type={config.model_type!r}. Export it as a folder (--format safetensors).")
    if config.hidden_act != "silu":
        raise ValueError(f"GGUF export needs hidden_act='silu' (llama.cpp's Llama graph); got {config.hidden_act!r}.")
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        raise ValueError(f"sliding_window={window} is below max_position_embeddings={config.max_position_embeddings}: "
                         "llama.cpp's llama graph attends to the whole context, so this model cannot be written.")
    rope_type, _ = _rope(config)
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not written to GGUF by this export (only 'default').")


def _rope(config) -> tuple[str, float]:
    """``(rope type, theta)`` of a config, whether it states ``rope_parameters`` or the older ``rope_theta``."""
    parameters = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope_type, float(theta)


# ----------------------------------------------------------------------------------------------------------------
# Tensors


def _rotary_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorders the rows ``[n * D, ...]`` of each head from halves (Hugging Face) to adjacent pairs (llama.cpp)."""
    shape = weight.shape
    return weight.reshape(num_heads, 2, shape[0] // num_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _place_heads(tensor: torch.Tensor, slots: tuple[int, ...], num_slots: int, head_dim: int, dim: int) -> torch.Tensor:
    """``tensor`` with its ``h`` heads (blocks of ``D`` along ``dim``) moved to ``slots`` of ``num_slots``, zeros
    elsewhere."""
    shape = list(tensor.shape)
    shape[dim] = num_slots * head_dim
    placed = tensor.new_zeros(shape)
    for head, slot in enumerate(slots):
        placed.narrow(dim, slot * head_dim, head_dim).copy_(tensor.narrow(dim, head * head_dim, head_dim))
    return placed


def _tensors(model: PreTrainedModel) -> tuple[dict[str, np.ndarray], list[LayerLayout]]:
    """The GGUF tensors (float32, by llama.cpp name) of ``model`` and its layers' layouts."""
    config = model.config
    state = {name: tensor.detach().float().cpu() for name, tensor in model.state_dict().items()}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    num_layers = config.num_hidden_layers
    output_biases = [state.get(f"model.layers.{index}.self_attn.o_proj.bias",
                               state.get(f"model.layers.{index}.self_attn.bias")) for index in range(num_layers)]
    layouts = layer_layouts(model, output_biases)
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
               "output_norm.weight": state["model.norm.weight"]}
    if not config.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    for index, layout in enumerate(layouts):
        prefix, block = f"model.layers.{index}.", f"blk.{index}."
        tensors[block + "ffn_norm.weight"] = state[prefix + "post_attention_layernorm.weight"]
        for projection, name in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            for kind in ("weight", "bias"):
                if prefix + f"mlp.{projection}.{kind}" in state:
                    tensors[block + f"{name}.{kind}"] = state[prefix + f"mlp.{projection}.{kind}"]
        if layout.num_heads == 0:
            continue
        tensors[block + "attn_norm.weight"] = state[prefix + "input_layernorm.weight"]
        tensors.update({block + name: tensor for name, tensor in _attention_tensors(
            state, prefix + "self_attn.", layout, head_dim, config.hidden_size, output_biases[index]).items()})
    return {name: tensor.contiguous().numpy() for name, tensor in tensors.items()}, layouts


def _attention_tensors(
    state: dict[str, torch.Tensor], prefix: str, layout: LayerLayout, head_dim: int, hidden_size: int,
    output_bias: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """``attn_q/k/v/output`` (and non-zero biases) of one layer, padded to ``layout`` and rotary-permuted."""
    n, k = layout.num_heads, layout.num_kv_heads
    if layout.zero_head:
        zeros = torch.zeros(head_dim, hidden_size)
        tensors = {"attn_q.weight": zeros, "attn_k.weight": zeros, "attn_v.weight": zeros,
                   "attn_output.weight": zeros.T.contiguous()}
    else:
        query = state[prefix + "q_proj.weight"]  # [h * D, C]
        if query.shape[0] != len(layout.query_slots) * head_dim:
            raise ValueError(f"{prefix}q_proj has {query.shape[0]} rows, but config.key_value_index records "
                             f"{len(layout.query_slots)} query heads of {head_dim}.")
        tensors = {
            "attn_q.weight": _rotary_permute(_place_heads(query, layout.query_slots, n, head_dim, 0), n),
            "attn_k.weight": _rotary_permute(state[prefix + "k_proj.weight"], k),
            "attn_v.weight": state[prefix + "v_proj.weight"],
            "attn_output.weight": _place_heads(state[prefix + "o_proj.weight"], layout.query_slots, n, head_dim, 1),
        }
        biases = {name: state.get(prefix + f"{name}_proj.bias") for name in ("q", "k", "v")}
        if any(bias is not None and bias.any() for bias in biases.values()):
            tensors["attn_q.bias"] = _rotary_permute(_place_heads(biases["q"], layout.query_slots, n, head_dim, 0), n)
            tensors["attn_k.bias"] = _rotary_permute(biases["k"], k)
            tensors["attn_v.bias"] = biases["v"]
    if output_bias is not None and output_bias.any():
        tensors["attn_output.bias"] = output_bias
    return tensors


# ----------------------------------------------------------------------------------------------------------------
# Metadata


def _write_parameters(writer: gguf.GGUFWriter, model: PreTrainedModel, layouts: list[LayerLayout], arch: str) -> None:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(getattr(config, "name_or_path", None) or config.model_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(config.vocab_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    heads = [layout.num_heads for layout in layouts]
    kv_heads = [layout.num_kv_heads for layout in layouts]
    writer.add_head_count(heads[0] if arch == "llama" else heads)
    writer.add_head_count_kv(kv_heads[0] if arch == "llama" else kv_heads)
    writer.add_key_length(head_dim)  # llama.cpp would assume C / H, which pruning changes
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope(config)[1])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def _write_tokenizer(
    writer: gguf.GGUFWriter, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None,
    tokenizer_gguf: str | None, tokenizer_pre: str | None,
) -> str:
    """Writes the tokenizer keys; returns where they came from: ``"gguf"``, ``"hf"`` or ``"none"``."""
    if tokenizer_gguf is not None:
        reader = gguf.GGUFReader(tokenizer_gguf)
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                value_type = field.types[0]
                sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(key, field.contents(), value_type, sub_type)
        return "gguf"
    merges = _bpe_merges(tokenizer) if tokenizer is not None else None
    if not merges:
        writer.add_tokenizer_model("none")  # token ids only: llama.cpp needs merges to tokenise byte-level BPE
        return "none"
    pre = tokenizer_pre or _pre_tokenizer_name(tokenizer)
    vocab_size = model.config.vocab_size
    tokens = [f"[PAD{index}]" for index in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    added = {token.content: token.special for token in tokenizer.added_tokens_decoder.values()}
    for token, index in tokenizer.get_vocab().items():
        if index < vocab_size:
            tokens[index] = token
            types[index] = (gguf.TokenType.NORMAL if token not in added else
                            gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(token_type) for token_type in types])
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return "hf"


def _pre_tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """``"gpt-2"`` for GPT-2's pre-tokenizer (``ByteLevel`` with its regex, nothing else); else a ``ValueError``."""
    described = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if described.get("type") == "ByteLevel" and described.get("use_regex", True):
        return "gpt-2"
    raise ValueError(
        f"The tokenizer's pre-tokenizer ({json.dumps(described)[:200]}) has no llama.cpp name this export knows: "
        "pass tokenizer_pre (llama.cpp's tokenizer.ggml.pre, e.g. 'llama3', 'qwen2', 'smollm'), or tokenizer_gguf "
        "(a GGUF file of the same tokenizer)."
    )


def _bpe_merges(tokenizer: PreTrainedTokenizerBase) -> list[str] | None:
    """The merges (``"a b"``) of a fast byte-level BPE tokenizer; None for any other kind of tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    described = json.loads(backend.to_str())
    if described["model"].get("type") != "BPE" or "ByteLevel" not in json.dumps(described.get("pre_tokenizer")):
        return None
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in described["model"].get("merges", [])]
