"""``sentinel-lightning export``: a fine-tune-with-pruning checkpoint to a compact model folder."""

from __future__ import annotations

import os
import tempfile
import zipfile
from typing import Any

from rich.console import Console

from sentinel_lightning.checks import describe_nonfinite, nonfinite_parameters
from sentinel_lightning.compaction import (
    bytes_per_decoded_token,
    compact,
    count_parameters,
    kv_cache_bytes_per_token,
    weight_bytes,
)
from sentinel_lightning.saving import check_output_directory, save_pruned
from sentinel_lightning.sharding import consolidate_checkpoint
from sentinel_lightning.standalone.pruned_modeling import stock_describes

BOUND_CONTEXT = 4096  # the context at which export states the bytes bound on decoding speed


def load_checkpoint(ckpt_path: str):
    """The ``GatedLanguageModel`` of a checkpoint file or sharded checkpoint folder
    (``sharding.consolidate_checkpoint``), refused with an error naming the file when it is empty or
    truncated, or holds non-finite weights or gates (a diverged run: export its best or an earlier checkpoint).
    """
    from sentinel_lightning.module import GatedLanguageModel

    if os.path.isdir(ckpt_path):  # sharded (ModelParallelStrategy): read through one consolidated file
        with tempfile.TemporaryDirectory() as folder:
            return load_checkpoint(consolidate_checkpoint(ckpt_path, os.path.join(folder, "consolidated.ckpt")))
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist.")
    if os.path.getsize(ckpt_path) == 0:
        raise ValueError(f"ckpt_path={ckpt_path!r} is an empty file (0 bytes), not a Lightning checkpoint.")
    if not zipfile.is_zipfile(ckpt_path):  # what torch.save writes; a truncated one has lost its directory
        raise ValueError(
            f"ckpt_path={ckpt_path!r} is not a readable Lightning checkpoint (a torch.save zip archive): it may be "
            "truncated by an interrupted save or copy, or be another kind of file."
        )
    module = GatedLanguageModel.load_from_checkpoint(ckpt_path, map_location="cpu")
    names = nonfinite_parameters(module)
    if names:
        raise ValueError(
            f"ckpt_path={ckpt_path!r} holds {describe_nonfinite(names)}: the run diverged. Export its best "
            "checkpoint or an earlier one."
        )
    return module


def check_not_model_folder(output_dir: str, model: str | None, ckpt_path: str) -> None:
    """Refuses an ``output_dir`` that is, holds or lies inside the model folder the checkpoint was trained from.

    That folder (``--model.model``, kept in the checkpoint's hyperparameters) is what the checkpoint rebuilds its
    model from: exporting into it would replace it, and the checkpoint could neither be exported nor resumed again.
    Whatever ``--overwrite`` says.
    """
    if not isinstance(model, str) or not os.path.isdir(model):
        return  # a hub name or the embedded default: no local folder to protect
    source, target = os.path.realpath(model), os.path.realpath(output_dir)
    if os.path.commonpath([source, target]) in (source, target):
        raise ValueError(
            f"--output_dir={output_dir!r} is, holds or lies inside {model!r}, the model folder that ckpt_path="
            f"{ckpt_path!r} was trained from (--model.model) and is rebuilt from; exporting there would destroy the "
            "checkpoint's base model, even with --overwrite. Choose another folder."
        )


def export_checkpoint(
    ckpt_path: str, output_dir: str, overwrite: bool = False, format: str = "safetensors", quantize: str | None = None
) -> dict[str, Any]:
    """Turns a fine-tune-with-pruning checkpoint into a compact model folder that loads and serves on its own.

    The ``GatedLanguageModel`` of the checkpoint is rebuilt, its pruned heads are removed and its gates folded
    into the weights (``compact``), and the result is written with ``save_pruned``, together with the model's
    tokenizer when it can be loaded (models built from a config have none). Prints one line of what it saved:
    heads, parameters, weight bytes and key/value-cache bytes per token, before and after; whether plain
    transformers loads the folder (without ``trust_remote_code``); and the bound on the decoding speed-up after
    ``BOUND_CONTEXT`` tokens that the bytes a decoding step reads give (``compaction.bytes_per_decoded_token``).

    Args:
        ckpt_path: Path of a Lightning checkpoint of a ``GatedLanguageModel``: a file, or the folder of shards a
            ``ModelParallelStrategy`` run writes (``sharding.consolidate_checkpoint``).
        output_dir: Folder to write the config, the safetensors weights and the tokenizer into; refused when it
            already holds files, unless ``overwrite``.
        overwrite: Whether to replace the model in a non-empty ``output_dir`` (``--overwrite true``): the model and
            tokenizer files of an earlier save are removed, other files kept (see ``save_pruned``).
        format: ``"safetensors"`` (a model folder, ``save_pruned``) or ``"gguf"``: one file for llama.cpp,
            ``output_dir/model-<TYPE>.gguf`` (``gguf_export.write_gguf``; the Llama family), with the tokenizer of
            the GGUF file the model came from, else the model's Hugging Face tokenizer.
        quantize: With ``format="gguf"``: ``f32`` (the default) or a llama.cpp type (``q8_0``, ``q4_0``,
            ``q4_1``, ``q4_k_m``, ... see ``gguf_export.QUANTIZATIONS``), written by llama.cpp's quantizer.

    Returns:
        ``{"output_dir", "tokenizer_saved", "heads_before", "heads_after", "parameters_before",
        "parameters_after", "bytes_before", "bytes_after", "kv_cache_bytes_per_token_before",
        "kv_cache_bytes_per_token_after", "loads_without_remote_code", "decode_bound_4096"}``: head and weight
        counts, the bytes of the weights (gates excluded, tied weights once) and the bytes one token adds to the
        key/value cache, before and after compaction; whether the folder's config describes every layer to the
        stock classes; the bytes-per-decoded-token ratio, before over after, at 4,096 tokens of context; with
        ``format="gguf"`` also ``"gguf"``, what ``write_gguf`` returns (its ``path`` the file written).
    """
    from sentinel_lightning.gguf_export import check_quantize
    from sentinel_lightning.pretrained import load_tokenizer

    if format not in EXPORT_FORMATS:
        raise ValueError(f"format={format!r} is not an export format; choose one of {', '.join(EXPORT_FORMATS)}.")
    if quantize is not None and format != "gguf":
        raise ValueError(f"quantize={quantize!r} applies to --format gguf only (format={format!r}).")
    check_quantize(quantize)
    check_output_directory(output_dir, overwrite, option="--overwrite true")  # before the checkpoint is loaded
    module = load_checkpoint(ckpt_path)
    hparams = module.hparams
    check_not_model_folder(output_dir, hparams.get("model"), ckpt_path)
    tokenizer = None
    if hparams.get("model") is not None or hparams.get("model_config") is None:
        try:
            tokenizer = load_tokenizer(hparams.get("model"), hparams.get("gguf_file"))
        except Exception as error:  # the model folder may have no tokenizer; the weights are what matters
            Console().print(f"export: no tokenizer saved ({error})", highlight=False, soft_wrap=True)
    compacted = compact(module)
    written = None
    if format == "gguf":
        written = _write_gguf(compacted, output_dir, tokenizer, hparams, quantize, overwrite)
    else:
        save_pruned(compacted, output_dir, tokenizer, overwrite=overwrite)
    summary = {
        "output_dir": output_dir,
        "tokenizer_saved": tokenizer is not None,
        "heads_before": module.gates.active.numel(),
        "heads_after": module.gates.num_active,
        "parameters_before": count_parameters(module.model),
        "parameters_after": count_parameters(compacted),
        "bytes_before": weight_bytes(module.model),
        "bytes_after": weight_bytes(compacted),
        "kv_cache_bytes_per_token_before": kv_cache_bytes_per_token(module.model),
        "kv_cache_bytes_per_token_after": kv_cache_bytes_per_token(compacted),
        "loads_without_remote_code": stock_describes(compacted),
        f"decode_bound_{BOUND_CONTEXT}": bytes_per_decoded_token(module.model, BOUND_CONTEXT)
        / bytes_per_decoded_token(compacted, BOUND_CONTEXT),
    }
    if written is not None:
        summary["gguf"] = written
        summary["output_dir"] = written["path"]
    Console().print(_summary_line(summary), highlight=False, soft_wrap=True)
    return summary


EXPORT_FORMATS = ("safetensors", "gguf")


def _write_gguf(compacted, output_dir: str, tokenizer, hparams, quantize: str | None, overwrite: bool) -> dict:
    """Writes ``output_dir/model-<TYPE>.gguf``, the tokenizer taken from the GGUF file the model came from when it
    came from one (the embedded default), else from ``tokenizer``."""
    from sentinel_lightning.gguf_export import write_gguf
    from sentinel_lightning.pretrained import resolve

    tokenizer_gguf = None
    if hparams.get("model") is not None or hparams.get("model_config") is None:  # not a model built from a config
        source, gguf_file = resolve(hparams.get("model"), hparams.get("gguf_file"))
        if gguf_file is not None and os.path.isfile(os.path.join(source, gguf_file)):
            tokenizer_gguf = os.path.join(source, gguf_file)
    path = os.path.join(output_dir, f"model-{(quantize or 'f32').upper()}.gguf")
    return write_gguf(compacted, path, tokenizer=tokenizer, tokenizer_gguf=tokenizer_gguf, quantize=quantize,
                      overwrite=overwrite)


def _summary_line(summary: dict[str, Any]) -> str:
    """The line ``export`` prints: what was kept, before -> after, and where it was written."""
    return (
        f"export: {summary['heads_after']}/{summary['heads_before']} heads kept; parameters "
        f"{summary['parameters_before']:,} -> {summary['parameters_after']:,}; weights {summary['bytes_before']:,} -> "
        f"{summary['bytes_after']:,} bytes; key/value cache {summary['kv_cache_bytes_per_token_before']:,} -> "
        f"{summary['kv_cache_bytes_per_token_after']:,} bytes per token; "
        + ("a llama.cpp GGUF file" if "gguf" in summary else "loads in plain transformers"
           if summary["loads_without_remote_code"] else "loads with trust_remote_code=True only (layers of "
           "different shapes)")
        + f"; decoding after {BOUND_CONTEXT:,} tokens at most {summary[f'decode_bound_{BOUND_CONTEXT}']:.3f}x as "
        f"fast by the bytes it reads; written to {summary['output_dir']}"
    )
