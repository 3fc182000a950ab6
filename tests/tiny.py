"""The tiny model most tests build or train: MLA + MoE (1 dense layer, 4 routed experts of width 16, 1 shared)
+ one MTP module, ~35K parameters (the `tiny` preset at width 32)."""

from nanoseek import ModelConfig

# As `--model.*` flags too (tests/test_distributed.py passes them on a torchrun command line).
TINY_MODEL = dict(dim=32, n_heads=2, n_layers=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                  v_head_dim=8, inter_dim=64, moe_inter_dim=16, n_routed_experts=4, max_seq_len=32)


def tiny_model_config(**overrides) -> ModelConfig:
    return ModelConfig.from_preset("tiny", **{**TINY_MODEL, **overrides})
