"""The model shapes of docs/benchmarks.md that exist only for the benchmarks (no checkpoint
has them): the Llama-1B anchor shape and the LLaMA-65B shape of the QLoRA paper's largest run.

They lived in ``lorax.models.llama.CONFIGS`` until 0.2; the library keeps the shapes of
published checkpoints only. Plain keyword dicts, so that importing this module imports
nothing heavy (the scripts set up JAX after parsing their arguments)::

    from bench_shapes import llama_config       # the scripts run from benchmarks/
    config = llama_config("llama-65b")           # a lorax.models.llama.LlamaConfig
"""

from __future__ import annotations

LLAMA = {
    # Llama-3.2-1B's widths with Llama 2's vocabulary and RoPE: the anchor of train_step.py
    # and multi_adapter.py
    "llama-1b-anchor": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    # LLaMA-65B (d 8192, 80 layers, 64 heads without GQA, ff 22016, vocab 32000): qlora_65b.py
    "llama-65b": dict(
        hidden_size=8192,
        intermediate_size=22016,
        num_hidden_layers=80,
        num_attention_heads=64,
        rms_norm_eps=1e-5,
    ),
}


def llama_config(name: str):
    """The :class:`lorax.models.llama.LlamaConfig` of the benchmark shape ``name``."""
    from lorax.models import llama

    if name not in LLAMA:
        raise KeyError(f"bench_shapes: no Llama shape {name!r}; known: {sorted(LLAMA)}")
    return llama.LlamaConfig(**LLAMA[name])
