"""Model: attention (GQA, MLA), DeepSeekMoE, multi-token prediction, the Transformer."""

from nanoseek.model.attention import GQAttention, KVCache, LatentCache, MLAttention
from nanoseek.model.moe import MoE
from nanoseek.model.transformer import Block, ModelOutput, Transformer, eval_mode

__all__ = ["Block", "GQAttention", "KVCache", "LatentCache", "MLAttention", "MoE", "ModelOutput", "Transformer",
           "eval_mode"]
