"""Parameter names and layouts between nanoseek and Hugging Face transformers, as data.

One table per transformers architecture maps a nanoseek state-dict name to the transformers one.
Placeholders: `{i}` is a layer index, `{j}` an expert index. nanoseek stores a layer's routed experts
stacked (`experts.w1` is [E, inter, dim]); transformers checkpoints name each expert separately
(`mlp.experts.{j}.gate_proj.weight`), so those rows carry `{j}` on the transformers side only.
The same tables drive the export and, read backwards, an import.

RoPE layouts: nanoseek rotates interleaved pairs (x[2i], x[2i+1]) by frequency i, as DeepSeek's reference
code and transformers' DeepseekV3 (`rope_interleave=True`) and DeepseekV2 do, so MLA rope rows are copied
as they are. transformers' Llama and Qwen3 rotate the halves (x[i], x[i + d/2]); `interleaved_to_halves`
reorders the rows of each GQA head's query/key projection (and its qk-norm weight) to match.
"""

from __future__ import annotations

import re

import torch

# dtype spellings the import and the export accept (a --dtype flag or a torch.dtype).
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """"fp32" / "bf16" / "fp16" (or their long names) or a float torch.dtype -> the torch.dtype; else ValueError."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype}: choose torch.float32, torch.bfloat16 or torch.float16")
    return dtype

# (nanoseek name, transformers name). Rows absent from a model (e.g. q_lora tensors) are simply unused.
_COMMON = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.ffn.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.ffn.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.ffn.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("head.weight", "lm_head.weight"),
]


def _attention_rows(**theirs: str) -> list[tuple[str, str]]:
    """Rows `layers.{i}.attn.OURS.weight` -> `model.layers.{i}.self_attn.THEIRS.weight`, from OURS=THEIRS."""
    return [(f"layers.{{i}}.attn.{ours}.weight", f"model.layers.{{i}}.self_attn.{hf}.weight")
            for ours, hf in theirs.items()]


_MLA = _attention_rows(wq="q_proj", wq_a="q_a_proj", q_norm="q_a_layernorm", wq_b="q_b_proj",
                       wkv_a="kv_a_proj_with_mqa", kv_norm="kv_a_layernorm", wkv_b="kv_b_proj", wo="o_proj")

_MOE = [
    ("layers.{i}.ffn.gate.weight", "model.layers.{i}.mlp.gate.weight"),
    ("layers.{i}.ffn.gate.balance_bias", "model.layers.{i}.mlp.gate.e_score_correction_bias"),
    ("layers.{i}.ffn.experts.w1", "model.layers.{i}.mlp.experts.{j}.gate_proj.weight"),
    ("layers.{i}.ffn.experts.w3", "model.layers.{i}.mlp.experts.{j}.up_proj.weight"),
    ("layers.{i}.ffn.experts.w2", "model.layers.{i}.mlp.experts.{j}.down_proj.weight"),
    ("layers.{i}.ffn.shared_experts.w1.weight", "model.layers.{i}.mlp.shared_experts.gate_proj.weight"),
    ("layers.{i}.ffn.shared_experts.w3.weight", "model.layers.{i}.mlp.shared_experts.up_proj.weight"),
    ("layers.{i}.ffn.shared_experts.w2.weight", "model.layers.{i}.mlp.shared_experts.down_proj.weight"),
]

_GQA = _attention_rows(wq="q_proj", wk="k_proj", wv="v_proj", wo="o_proj", q_norm="q_norm", k_norm="k_norm")

# model_type -> name table. DeepseekV2 has no e_score_correction_bias; the exporter checks the bias is inert.
NAME_TABLES: dict[str, list[tuple[str, str]]] = {
    "deepseek_v3": _COMMON + _MLA + _MOE,
    "deepseek_v2": _COMMON + _MLA + [row for row in _MOE if not row[0].endswith("balance_bias")],
    "llama": _COMMON + [row for row in _GQA if "_norm" not in row[0]],
    "qwen3": _COMMON + _GQA,
}

# Stacked nanoseek expert tensors: these names expand to one transformers tensor per expert.
STACKED_EXPERTS = ("experts.w1", "experts.w2", "experts.w3")
# GQA tensors whose rows are RoPE dims per head, and which kind of head they belong to.
ROPE_ROWS = {"attn.wq.weight": "q", "attn.wk.weight": "kv", "attn.q_norm.weight": "norm",
             "attn.k_norm.weight": "norm"}


def _pattern(template: str) -> re.Pattern:
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile(body + r"\Z")


_COMPILED = {arch: [(_pattern(ns), ns, _pattern(hf), hf) for ns, hf in rows] for arch, rows in NAME_TABLES.items()}


def _table(model_type: str):
    if model_type not in _COMPILED:
        raise ValueError(f"model_type={model_type!r}: no name table; known: {', '.join(NAME_TABLES)}")
    return _COMPILED[model_type]


def to_hf_name(name: str, model_type: str, expert: int | None = None) -> str | None:
    """nanoseek state-dict name -> transformers name (None if the table has no row for it).

    A stacked expert tensor (`layers.3.ffn.experts.w1`) needs `expert`, the index of the slice.
    """
    for ns_re, _, _, hf in _table(model_type):
        m = ns_re.match(name)
        if m:
            if "{j}" in hf and expert is None:
                raise ValueError(f"{name} is stacked over experts; pass expert=j for one slice")
            return hf.format(i=m.group("i") if "{i}" in hf else "", j=expert)
    return None


def from_hf_name(name: str, model_type: str) -> tuple[str, int | None] | None:
    """transformers name -> (nanoseek name, expert index or None); None if the table has no row for it.

    An expert index means the tensor is slice `expert` of the stacked nanoseek tensor.
    """
    for _, ns, hf_re, hf in _table(model_type):
        m = hf_re.match(name)
        if m:
            expert = int(m.group("j")) if "{j}" in hf else None
            return ns.format(i=m.group("i") if "{i}" in ns else ""), expert
    return None


def interleaved_to_halves(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder RoPE dims from pairs (2i, 2i+1) to pairs (i, i + d/2) within each head.

    weight: [n_heads * head_dim, ...] (a q/k projection) or [head_dim] (a per-head norm weight);
    returns the same shape with rows of each head ordered [0, 2, 4, ..., 1, 3, 5, ...].
    """
    return _reorder_heads(weight, head_dim, torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)]))


def halves_to_interleaved(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of `interleaved_to_halves`: rows of each head from (i, i + d/2) pairs back to (2i, 2i+1)."""
    half = torch.arange(head_dim // 2)
    return _reorder_heads(weight, head_dim, torch.stack([half, half + head_dim // 2], dim=1).flatten())


def _reorder_heads(weight: torch.Tensor, head_dim: int, perm: torch.Tensor) -> torch.Tensor:
    return weight.reshape(-1, head_dim, *weight.shape[1:])[:, perm].reshape(weight.shape)
