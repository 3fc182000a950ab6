"""Parameter names, file names and RoPE layouts shared by the transformers export and import, as data.

One table per transformers architecture maps nanoseek state-dict names to transformers ones (the export reads it
forwards, the import backwards). `{i}` is a layer index, `{j}` an expert index on the transformers side only:
nanoseek stacks a layer's routed experts (`experts.w1` is [E, inter, dim]), transformers names each one.
RoPE: nanoseek rotates interleaved pairs (x[2i], x[2i+1]), as DeepSeek and transformers' DeepseekV3/V2 do; Llama
and Qwen3 rotate halves (x[i], x[i + d/2]). Permuting the rows of each GQA head's query/key projection (and
qk-norm weight) between the two is exact: q.k is a sum over pairs, and each pair keeps its frequency."""

import re

import torch

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# dtype spellings the import and the export accept (a --dtype flag or a torch.dtype).
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    resolved = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in DTYPES.values():
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)} or the torch dtype they name")
    return resolved


def _rows(ours: str, theirs: str, **names: str) -> list[tuple[str, str]]:
    """(nanoseek name, transformers name) rows `OURS.a.weight` -> `THEIRS.b.weight`, one per a=b."""
    return [(f"{ours}.{a}.weight", f"{theirs}.{b}.weight") for a, b in names.items()]


_SWIGLU = dict(w1="gate_proj", w3="up_proj", w2="down_proj")
# Rows absent from a model (e.g. q_lora tensors) are simply unused.
_COMMON = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
           ("head.weight", "lm_head.weight"),
           *_rows("layers.{i}", "model.layers.{i}", attn_norm="input_layernorm", ffn_norm="post_attention_layernorm"),
           *_rows("layers.{i}.ffn", "model.layers.{i}.mlp", **_SWIGLU)]
_GQA = _rows("layers.{i}.attn", "model.layers.{i}.self_attn", wq="q_proj", wk="k_proj", wv="v_proj", wo="o_proj",
             q_norm="q_norm", k_norm="k_norm")
_MLA = _rows("layers.{i}.attn", "model.layers.{i}.self_attn", wq="q_proj", wq_a="q_a_proj", q_norm="q_a_layernorm",
             wq_b="q_b_proj", wkv_a="kv_a_proj_with_mqa", kv_norm="kv_a_layernorm", wkv_b="kv_b_proj", wo="o_proj")
_MOE = [("layers.{i}.ffn.gate.weight", "model.layers.{i}.mlp.gate.weight"),
        ("layers.{i}.ffn.gate.balance_bias", "model.layers.{i}.mlp.gate.e_score_correction_bias"),
        *[(f"layers.{{i}}.ffn.experts.{ours}", f"model.layers.{{i}}.mlp.experts.{{j}}.{hf}.weight")
          for ours, hf in _SWIGLU.items()],
        *_rows("layers.{i}.ffn.shared_experts", "model.layers.{i}.mlp.shared_experts", **_SWIGLU)]

# model_type -> name table. DeepseekV2 has no e_score_correction_bias; the exporter checks the bias is inert.
NAME_TABLES: dict[str, list[tuple[str, str]]] = {
    "llama": _COMMON + [row for row in _GQA if "_norm" not in row[0]],
    "qwen3": _COMMON + _GQA,
    "deepseek_v3": _COMMON + _MLA + _MOE,
    "deepseek_v2": _COMMON + _MLA + [row for row in _MOE if not row[0].endswith("balance_bias")],
}

# Stacked nanoseek expert tensors: these names expand to one transformers tensor per expert.
STACKED_EXPERTS = ("experts.w1", "experts.w2", "experts.w3")
# GQA tensors whose rows are RoPE dims per head.
ROPE_ROWS = ("attn.wq.weight", "attn.wk.weight", "attn.q_norm.weight", "attn.k_norm.weight")


def _pattern(template: str) -> re.Pattern:
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile(body + r"\Z")


_COMPILED = {arch: [(_pattern(ns), ns, _pattern(hf), hf) for ns, hf in rows] for arch, rows in NAME_TABLES.items()}


def _table(model_type: str):
    if model_type not in _COMPILED:
        raise ValueError(f"model_type={model_type!r}: no name table; known: {', '.join(NAME_TABLES)}")
    return _COMPILED[model_type]


def to_hf_name(name: str, model_type: str, expert: int | None = None) -> str | None:
    """nanoseek state-dict name -> transformers name, or None; a stacked expert tensor needs `expert`, the slice."""
    for ns_re, _, _, hf in _table(model_type):
        m = ns_re.match(name)
        if m:
            if "{j}" in hf and expert is None:
                raise ValueError(f"{name} is stacked over experts; pass expert=j for one slice")
            return hf.format(**m.groupdict(), j=expert)
    return None


def from_hf_name(name: str, model_type: str) -> tuple[str, int | None] | None:
    """transformers name -> (nanoseek name, index of its slice of a stacked expert tensor or None), or None."""
    for _, ns, hf_re, _ in _table(model_type):
        m = hf_re.match(name)
        if m:
            expert = m.groupdict().get("j")
            return ns.format(**m.groupdict()), None if expert is None else int(expert)
    return None


def interleaved_to_halves(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of each head from pairs (2i, 2i+1) to pairs (i, i + d/2); weight: [n_heads * head_dim, ...] (a q/k
    projection) or [head_dim] (a per-head norm weight), same shape out."""
    return _reorder_heads(weight, torch.arange(head_dim).view(-1, 2).T.flatten())  # [0, 2, 4, ..., 1, 3, 5, ...]


def halves_to_interleaved(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of `interleaved_to_halves`."""
    return _reorder_heads(weight, torch.arange(head_dim).view(2, -1).T.flatten())  # [0, d/2, 1, d/2 + 1, ...]


def _reorder_heads(weight: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return weight.reshape(-1, len(perm), *weight.shape[1:])[:, perm].reshape(weight.shape)
