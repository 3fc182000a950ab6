"""Helpers shared by the Hugging Face export and import tests (plain functions, not tests)."""

from __future__ import annotations

import torch

from nanoseek import ModelConfig, Transformer


def gqa_config(**overrides) -> ModelConfig:
    """A tiny dense GQA config (4 query heads over 2 KV heads); `vocab_size` is each test file's own."""
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, attention="gqa", inter_dim=40,
                n_routed_experts=0, mtp_depth=0)
    base.update(overrides)
    return ModelConfig(**base)


def max_logit_diff(model: Transformer, hf, seq_len: int = 24, seed: int = 1) -> float:
    """Largest |logit difference| between a nanoseek model and a transformers model on 2 random sequences."""
    idx = torch.randint(0, model.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours, theirs = model(idx).logits, hf(input_ids=idx).logits
    assert ours.shape == theirs.shape
    return (ours - theirs).abs().max().item()
