"""The memory table of docs/scale.md: what the gates and the head callbacks keep, from public configs alone.

Builds SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B and Llama-3.1-70B from their published shapes with
``transformers.LlamaConfig`` (nothing downloaded, no weights: the meta device) and prints, for the job's defaults
and each option, ``memory.head_state_bytes`` and ``memory.model_bytes`` in GB (10^9 bytes).

    python scripts/memory_table.py                       # batch 4 x 256 tokens, as the default job
    python scripts/memory_table.py --batch-size 1 --sequence-length 4096
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig

from sentinel_lightning.memory import head_state_bytes, model_bytes

CONFIGS = {  # the published config.json numbers of each model
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "Llama-3.1-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
LORA = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"]}
SETTINGS = {  # name -> head_state_bytes arguments
    "job default (linear compensation)": {"compensate": "linear"},
    "mean compensation": {"compensate": "mean"},
    "no compensation": {"compensate": "none"},
    "linear + teacher as loaded": {"compensate": "linear", "distillation_teacher": "loaded"},
    "linear + teacher before pruning, LoRA": {"compensate": "linear", "distillation_teacher": "before_pruning",
                                              "lora": LORA},
}
PERSISTENT = ("gates", "gate_gradient_and_optimizer", "reconstruction", "statistics", "second_moment")
STEP = ("step_recording", "step_head_outputs", "entropy_step_attention")


def gb(value: int) -> str:
    return f"{value / 1e9:.3g}" if value else "0"


def tables(batch_size: int, sequence_length: int) -> str:
    """The markdown tables: the models for scale, then the per-head states of every setting."""
    dtype, activations = torch.bfloat16, torch.bfloat16
    lines = [
        "| model | L x H x D | weights (bf16) | full fine-tune: fp32 grad + AdamW | LoRA r=16: its grad + AdamW |",
        "|---|---|---|---|---|",
    ]
    configs = {name: LlamaConfig(**numbers) for name, numbers in CONFIGS.items()}
    for name, config in configs.items():
        full, lora = model_bytes(config, dtype=dtype), model_bytes(config, lora=LORA, dtype=dtype)
        shape = f"{config.num_hidden_layers} x {config.num_attention_heads} x {config.head_dim}"
        lines.append(f"| {name} | {shape} | {gb(full['weights'])} | {gb(full['trainable_with_adamw'])} | "
                     f"{gb(lora['trainable_with_adamw'])} |")
    lines += [
        "",
        "| model | setting | reconstruction | second moment | other persistent | step recording | step head "
        "outputs | entropy step attention | pruning event | teacher | peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, config in configs.items():
        for setting, arguments in SETTINGS.items():
            states = head_state_bytes(config, batch_size=batch_size, sequence_length=sequence_length, dtype=dtype,
                                      activation_dtype=activations, **arguments)
            persistent = sum(states[key] for key in PERSISTENT)
            other = persistent - states["reconstruction"] - states["second_moment"]
            step = sum(states[key] for key in STEP)
            peak = persistent + max(step, states["pruning_event"]) + states["teacher"]
            lines.append(
                f"| {name} | {setting} | {gb(states['reconstruction'])} | {gb(states['second_moment'])} | "
                f"{gb(other)} | {gb(states['step_recording'])} | {gb(states['step_head_outputs'])} | "
                f"{gb(states['entropy_step_attention'])} | {gb(states['pruning_event'])} | "
                f"{gb(states['teacher'])} | {gb(peak)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=256)
    args = parser.parse_args(argv)
    text = tables(args.batch_size, args.sequence_length)
    print(text)
    return text


if __name__ == "__main__":
    main()
