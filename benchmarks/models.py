"""Model sizes for the benchmarks, all built from configs (random init, no hub).

``llama-*``: Llama-style causal LMs (RMSNorm, SwiGLU, RoPE, untied embeddings).
``gpt2-*``: GPT-2-style causal LMs (``Conv1D`` weights stored [in, out], tied embeddings).
``vit-*``: ViT image classifiers. Dropout is off everywhere, so every method sees the same
deterministic function of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSize:
    name: str
    family: str  # "llama" | "gpt2" | "vit"
    hidden: int
    layers: int
    heads: int
    vocab: int = 0  # causal LMs
    seq_len: int = 64  # causal LMs: tokens per sequence
    image_size: int = 32  # vit
    patch_size: int = 8  # vit
    num_labels: int = 10  # vit

    @property
    def is_lm(self) -> bool:
        return self.family in ("llama", "gpt2")


def intermediate_size(hidden: int) -> int:
    """Llama MLP width for ``hidden``: 8/3 · hidden, rounded to a multiple of 16."""
    return max(16, int(round(8 * hidden / 3 / 16)) * 16)


SIZES: dict[str, ModelSize] = {
    s.name: s
    for s in (
        # CPU sizes (quick mode uses the first three Llama sizes, one GPT-2 and the ViT)
        ModelSize("llama-xs", "llama", hidden=64, layers=2, heads=4, vocab=512, seq_len=64),
        ModelSize("llama-s", "llama", hidden=128, layers=4, heads=4, vocab=1024, seq_len=64),
        ModelSize("llama-m", "llama", hidden=256, layers=4, heads=8, vocab=2048, seq_len=64),
        ModelSize("llama-l", "llama", hidden=512, layers=6, heads=8, vocab=8192, seq_len=128),
        ModelSize("gpt2-s", "gpt2", hidden=128, layers=4, heads=4, vocab=1024, seq_len=64),
        ModelSize("gpt2-m", "gpt2", hidden=256, layers=4, heads=8, vocab=2048, seq_len=64),
        ModelSize(
            "vit-tiny", "vit", hidden=64, layers=2, heads=4, image_size=32, patch_size=8, num_labels=10
        ),
        ModelSize("vit-s", "vit", hidden=192, layers=6, heads=3, image_size=64, patch_size=8, num_labels=10),
        # GPU sizes (full mode with --device cuda); the CPU plan runs llama-160m and gpt2-124m for a few steps
        ModelSize("llama-160m", "llama", hidden=768, layers=12, heads=12, vocab=32000, seq_len=512),
        ModelSize("llama-410m", "llama", hidden=1024, layers=24, heads=16, vocab=32000, seq_len=512),
        ModelSize("llama-1b", "llama", hidden=2048, layers=16, heads=32, vocab=32000, seq_len=512),
        ModelSize("gpt2-124m", "gpt2", hidden=768, layers=12, heads=12, vocab=50257, seq_len=512),
        ModelSize(
            "vit-base", "vit", hidden=768, layers=12, heads=12, image_size=224, patch_size=16, num_labels=100
        ),
        # the smallest configuration, for the fast test
        ModelSize("llama-test", "llama", hidden=32, layers=1, heads=2, vocab=128, seq_len=16),
    )
}


def build_model(size: ModelSize, seed: int) -> nn.Module:
    """A freshly initialised model of ``size`` (seeded: identical weights for every method)."""
    torch.manual_seed(seed)
    if size.family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=size.vocab,
            hidden_size=size.hidden,
            intermediate_size=intermediate_size(size.hidden),
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.heads,
            max_position_embeddings=max(size.seq_len, 128),
            tie_word_embeddings=False,
            attention_dropout=0.0,
        )
        return LlamaForCausalLM(config)
    if size.family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=size.vocab,
            n_embd=size.hidden,
            n_layer=size.layers,
            n_head=size.heads,
            n_positions=max(size.seq_len, 128),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        return GPT2LMHeadModel(config)
    if size.family == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            hidden_size=size.hidden,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            intermediate_size=4 * size.hidden,
            image_size=size.image_size,
            patch_size=size.patch_size,
            num_labels=size.num_labels,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return ViTForImageClassification(config)
    raise ValueError(f"Unknown model family {size.family!r}.")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
