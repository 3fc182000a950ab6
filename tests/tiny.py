"""What many tests build or train on: the tiny model (MLA + MoE with 1 dense layer, 4 routed experts of width
16 and 1 shared, + one MTP module, ~35K parameters: the `tiny` preset at width 32) and a small text corpus."""

import random
from pathlib import Path

from nanoseek import ModelConfig

# As `--model.*` flags too (tests/test_distributed.py passes them on a torchrun command line).
TINY_MODEL = dict(dim=32, n_heads=2, n_layers=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                  v_head_dim=8, inter_dim=64, moe_inter_dim=16, n_routed_experts=4, max_seq_len=32)


def tiny_model_config(**overrides) -> ModelConfig:
    return ModelConfig.from_preset("tiny", **{**TINY_MODEL, **overrides})


CORPUS_WORDS = ("the quick brown fox jumps over a lazy dog while seven small cats sleep near warm stones "
                "and rain falls on quiet green hills").split()


def write_corpus(path: Path, words: list[str] = CORPUS_WORDS) -> Path:
    """~17 KB of deterministic pseudo-sentences over `words` (about 30 distinct characters)."""
    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(300)))
    return path


# Every attention/FFN combination decoding must handle: name -> (preset, ModelConfig overrides).
ARCHITECTURES = {
    "gqa": ("tiny-gqa", {}),
    "mla": ("tiny-dense", {}),
    "mla-qlora": ("tiny-dense", {"q_lora_rank": 24}),
    "mla-moe-mtp": ("tiny", {}),
    "gqa-moe": ("tiny-gqa", {"n_routed_experts": 4, "n_activated_experts": 2}),
}
