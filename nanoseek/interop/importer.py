"""Import a transformers folder (config.json + safetensors) or a GGUF file as a nanoseek Transformer.

llama (Llama, SmolLM2, ...) and qwen3 become dense GQA models, deepseek_v3 / deepseek_v2 MLA models with MoE:
what `export_hf` writes, so export -> import gives back the same state dict (less the MTP modules). Weights travel
only through the name tables of names.py read backwards, then the rotate-half transforms below.
Refused with a one-line ValueError: RoPE scalings nanoseek does not compute (llama3, dynamic, longrope, ...),
non-zero attention/MLP biases, activations other than SiLU, sliding-window attention, partial rotary dims,
and any tensor that is missing, unknown or of the wrong shape (named in the message)."""

import json
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nanoseek.config import ModelConfig
from nanoseek.data.tokenizer import TOKENIZER_FILE, _load_tokenizer_json
from nanoseek.interop.gguf import is_gguf_file, read_gguf
from nanoseek.interop.names import (CONFIG_FILE, INDEX_FILE, NAME_TABLES, ROPE_ROWS, SINGLE_FILE, STACKED_EXPERTS,
                                    from_hf_name, halves_to_interleaved, resolve_dtype, to_hf_name)
from nanoseek.model import Transformer
from nanoseek.model.layers import _yarn_mscale
from nanoseek.train.checkpoint import COMPLETE_FILE

_REQUIRED = object()  # a config key without a default
# transformers' defaults for keys a config.json may leave out (its *Config classes); Llama derives head_dim.
_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, head_dim=None),
    "qwen3": dict(max_position_embeddings=32768, head_dim=128),
    "deepseek_v3": dict(max_position_embeddings=4096, q_lora_rank=1536, moe_intermediate_size=2048,
                        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3,
                        routed_scaling_factor=2.5, n_group=8, topk_group=4, norm_topk_prob=True,
                        topk_method="noaux_tc"),
    "deepseek_v2": dict(max_position_embeddings=2048, q_lora_rank=1536, moe_intermediate_size=1407,
                        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=_REQUIRED, first_k_dense_replace=0,
                        routed_scaling_factor=1.0, n_group=None, topk_group=None, norm_topk_prob=False,
                        topk_method="greedy"),
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def gqa_rope_rows(tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """q/k projection [n_heads * head_dim, dim] or qk-norm weight [head_dim]: every dim of a head is rotated."""
    return halves_to_interleaved(tensor, cfg.head_dim)


def mla_query_rope_rows(tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """wq / wq_b [n_heads * (Dn + Dr), in]: each head's last Dr rows are its rope dims."""
    heads = tensor.reshape(cfg.n_heads, cfg.qk_head_dim, -1)
    nope, rope = heads.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=1)
    rope = halves_to_interleaved(rope.reshape(-1, rope.shape[-1]), cfg.qk_rope_head_dim).reshape(rope.shape)
    return torch.cat([nope, rope], dim=1).reshape(tensor.shape)


def mla_key_rope_rows(tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """wkv_a [kv_lora_rank + Dr, dim]: the last Dr rows are the rope key all heads share."""
    latent, rope = tensor.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim])
    return torch.cat([latent, halves_to_interleaved(rope, cfg.qk_rope_head_dim)])


# For folders that rotate halves (Llama, Qwen3, DeepseekV3 with rope_interleave false), keyed by the end of the
# nanoseek name: (tensor, config) -> the tensor in nanoseek's interleaved-pairs layout, same shape.
ROTATE_HALF_TRANSFORMS: dict[str, dict[str, Callable[[torch.Tensor, ModelConfig], torch.Tensor]]] = {
    "gqa": dict.fromkeys(ROPE_ROWS, gqa_rope_rows),  # the rows export permutes, permuted back
    "mla": {"attn.wq.weight": mla_query_rope_rows, "attn.wq_b.weight": mla_query_rope_rows,
            "attn.wkv_a.weight": mla_key_rope_rows},
}


def is_hf_folder(path: str | Path) -> bool:
    """True for a folder whose config.json has a `model_type` (a nanoseek checkpoint's is a run config)."""
    try:
        return "model_type" in read_hf_config(path)
    except ValueError:
        return False


def import_hf(path: str | Path, dtype: torch.dtype | str = torch.float32) -> Transformer:
    """A transformers folder (config.json, model.safetensors or indexed shards) or a .gguf file as a nanoseek
    Transformer in eval mode on CPU, weights in `dtype` (MoE balance biases stay float32), the transformers config
    as `model.hf_config`. Its float32 logits match transformers' to a few 1e-6 (their float32 RoPE angles)."""
    dtype = resolve_dtype(dtype)
    path = Path(path).expanduser()
    if is_gguf_file(path):
        hf, tensors = read_gguf(path)
        cfg = model_config_from_hf(hf, source=str(path))
    else:
        hf = read_hf_config(path)
        cfg = model_config_from_hf(hf, source=str(path / CONFIG_FILE))
        tensors = read_hf_tensors(path)
    model = Transformer(cfg)
    model.load_state_dict(nanoseek_state_dict(tensors, cfg, hf, expected=model.state_dict()))
    biases = {module: module.balance_bias for module in model.modules() if hasattr(module, "balance_bias")}
    model = model.to(dtype).eval()  # a new tensor for every buffer whose dtype changes: `biases` stay float32
    for module, bias in biases.items():  # routing compares biased scores: the bias keeps full precision
        module.balance_bias = bias
    model.hf_config = hf
    return model


def load_hf_tokenizer(path: str | Path):
    """The folder's tokenizer.json as a nanoseek HFTokenizer (kind "file"), or None when there is none."""
    file = _folder(path) / TOKENIZER_FILE
    return _load_tokenizer_json(file, kind="file") if file.is_file() else None


def _folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"model folder {str(folder)!r} does not exist; pass a local folder written by "
                         "save_pretrained or `nanoseek export` (hub names are not downloaded)")
    return folder


def read_hf_config(path: str | Path) -> dict:
    folder = _folder(path)
    if (folder / COMPLETE_FILE).is_file() or (folder / "checkpoints").is_dir():
        raise ValueError(f"{str(folder)!r} is a nanoseek checkpoint or run directory, not a transformers folder; "
                         "load it with nanoseek.load_checkpoint(path)")
    if not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"{str(folder)!r} has no {CONFIG_FILE}; pass a folder written by save_pretrained "
                         "or `nanoseek export`")
    try:
        return json.loads((folder / CONFIG_FILE).read_text())
    except ValueError as err:
        raise ValueError(f"{folder / CONFIG_FILE} is not valid JSON ({err}); re-save it with save_pretrained") from None


def model_config_from_hf(hf: dict, source: str = CONFIG_FILE) -> ModelConfig:
    """transformers config.json dict -> the nanoseek ModelConfig that computes the same function."""
    model_type = hf.get("model_type")
    if model_type not in NAME_TABLES:
        raise ValueError(f"{source}: model_type={model_type!r} is not supported; nanoseek imports "
                         f"{', '.join(NAME_TABLES)} (Llama-family dense models and its own exports)")

    def get(key: str, default=_REQUIRED):
        # transformers writes an unset key as null; both mean "the default" (q_lora_rank is read directly).
        value = default if hf.get(key) is None else hf[key]
        if value is _REQUIRED:
            raise ValueError(f"{source} has no {key!r}, which a {model_type} config needs; re-save the model "
                             "with save_pretrained")
        return value

    act = get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{source}: hidden_act={act!r}; nanoseek's MLP is SwiGLU (silu) only")
    n_heads = get("num_attention_heads")
    fields = dict(vocab_size=get("vocab_size"), dim=get("hidden_size"), n_layers=get("num_hidden_layers"),
                  n_heads=n_heads, inter_dim=get("intermediate_size"),
                  max_seq_len=get("max_position_embeddings", _DEFAULTS[model_type]["max_position_embeddings"]),
                  norm_eps=float(get("rms_norm_eps", 1e-6)), tie_embeddings=bool(get("tie_word_embeddings", False)),
                  init_std=float(get("initializer_range", 0.02) or 0.02), mtp_depth=0, dropout=0.0)
    if model_type in ("llama", "qwen3"):
        if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or ()):
            raise ValueError(f"{source}: sliding-window attention (use_sliding_window / layer_types) is not "
                             "supported; nanoseek attends over the full context")
        fields.update(attention="gqa", n_routed_experts=0, qk_norm=model_type == "qwen3",
                      n_kv_heads=get("num_key_value_heads", None) or n_heads,
                      head_dim=get("head_dim", None) or _DEFAULTS[model_type]["head_dim"] or fields["dim"] // n_heads)
    else:
        fields.update(_mla_moe_fields(hf, model_type, get, source))
    fields.update(rope_fields(hf, fields["attention"], fields["max_seq_len"], source))
    try:
        return ModelConfig(**fields)
    except ValueError as err:
        raise ValueError(f"{source} gives a config nanoseek rejects: {err}") from None


def _mla_moe_fields(hf: dict, model_type: str, get, source: str) -> dict:
    defaults = _DEFAULTS[model_type]

    def key(name: str):  # an absent key means transformers' default; null keeps its meaning (none / off)
        return hf[name] if name in hf else defaults[name]

    n_heads = get("num_attention_heads")
    if get("num_key_value_heads", n_heads) != n_heads:
        raise ValueError(f"{source}: num_key_value_heads={hf['num_key_value_heads']} != num_attention_heads="
                         f"{n_heads}; MLA makes one key/value per head, so the two must be equal")
    if get("moe_layer_freq", 1) != 1:
        raise ValueError(f"{source}: moe_layer_freq={hf['moe_layer_freq']}; nanoseek puts MoE in every layer "
                         "from first_k_dense_replace on (moe_layer_freq=1)")
    fields = dict(attention="mla", q_lora_rank=key("q_lora_rank") or 0, kv_lora_rank=get("kv_lora_rank"),
                  qk_nope_head_dim=get("qk_nope_head_dim"), qk_rope_head_dim=get("qk_rope_head_dim"),
                  v_head_dim=get("v_head_dim"), moe_inter_dim=key("moe_intermediate_size") or 96)
    n_routed = key("n_routed_experts") or 0
    if n_routed == 0:
        return {**fields, "n_routed_experts": 0}
    sigmoid = model_type == "deepseek_v3"
    expected = "sigmoid" if sigmoid else "softmax"
    scoring = get("scoring_func", expected)
    if scoring != expected:
        raise ValueError(f"{source}: scoring_func={scoring!r} with model_type={model_type!r}; transformers' "
                         f"{model_type} routes with {expected} scores, so the config contradicts itself")
    if bool(key("norm_topk_prob")) != sigmoid:
        raise ValueError(f"{source}: norm_topk_prob={key('norm_topk_prob')} with {scoring} routing; nanoseek "
                         "renormalises the top-k weights of sigmoid routing and never those of softmax routing")
    groups, limited = key("n_group") or 1, key("topk_group") or 1
    if not sigmoid:  # DeepseekV2 limits groups only with topk_method "group_limited_greedy"
        method = key("topk_method")
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"{source}: topk_method={method!r} is not supported for softmax routing; nanoseek "
                             "routes 'greedy' or 'group_limited_greedy'")
        if method == "greedy":
            groups = limited = 1
    return {**fields, "n_routed_experts": n_routed, "n_shared_experts": key("n_shared_experts") or 0,
            "n_activated_experts": get("num_experts_per_tok", defaults["num_experts_per_tok"]),
            "n_dense_layers": min(key("first_k_dense_replace") or 0, get("num_hidden_layers")),
            "route_scale": float(key("routed_scaling_factor") or 1.0), "score_func": scoring,
            "n_expert_groups": groups, "n_limited_groups": limited}


def rope_fields(hf: dict, attention: str, max_seq_len: int, source: str = CONFIG_FILE) -> dict:
    """ModelConfig RoPE fields from 4.x `rope_theta` + `rope_scaling` or 5.x `rope_parameters` (`rope_scaling` first,
    as transformers 5.x reads them). YaRN's attention factor on cos/sin is matched by nanoseek's `mscale`, next to
    `mscale_all_dim` for MLA (both put mscale(mscale_all_dim)^2 on the softmax scale), with it 0 for GQA."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = params.get("rope_theta") or hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
    fields: dict = {"rope_theta": float(theta or 10000.0)}
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"{source}: partial_rotary_factor={partial}; nanoseek rotates every rope dim of a head")
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return {**fields, "rope_scaling": "none"}
    if kind not in ("linear", "yarn"):
        raise ValueError(f"{source}: RoPE scaling {kind!r} is not supported by nanoseek (it computes default, "
                         "linear and yarn); pick a model without it or add the scaling to nanoseek's RotaryEmbedding")
    original = params.get("original_max_position_embeddings") or max_seq_len
    factor = params.get("factor") or max_seq_len / original
    fields.update(rope_scaling=kind, rope_factor=float(factor))
    if kind == "linear":
        if attention == "mla" and params.get("mscale_all_dim"):  # DeepseekV3/V2 then rescale the softmax too
            raise ValueError(f"{source}: linear RoPE scaling with mscale_all_dim={params['mscale_all_dim']} is not "
                             "supported; nanoseek applies mscale_all_dim with yarn only")
        return fields
    if params.get("truncate", True) is False:
        raise ValueError(f"{source}: yarn with truncate=false is not supported; nanoseek rounds the correction "
                         "range to whole dims as DeepSeek and transformers do by default")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:  # transformers' inference, kept exactly (even where it drops mscale)
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else _yarn_mscale(factor))
    # Only DeepseekV3/V2 attention applies mscale(mscale_all_dim)^2 to the softmax scale.
    kept_all_dim = float(mscale_all_dim or 0.0) if attention == "mla" else 0.0
    # nanoseek's cos/sin factor: mscale(mscale) / mscale(mscale_all_dim), or mscale(mscale) when the latter is 0.
    target = attention_factor * (_yarn_mscale(factor, kept_all_dim) if kept_all_dim else 1.0)
    if factor <= 1 and abs(target - 1.0) > 1e-12:
        raise ValueError(f"{source}: yarn factor={factor} with attention_factor={attention_factor}; nanoseek "
                         "applies no attention factor without scaling (factor > 1)")
    solved = (target - 1.0) / (0.1 * math.log(factor)) if factor > 1 else 1.0
    fields.update(rope_original_max_seq_len=int(original), beta_fast=float(params.get("beta_fast") or 32.0),
                  beta_slow=float(params.get("beta_slow") or 1.0), mscale=solved, mscale_all_dim=kept_all_dim)
    return fields


def read_hf_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json lists (CPU)."""
    folder, weight_map = Path(folder), None
    if (folder / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{folder / INDEX_FILE} has no readable weight_map; re-save the model") from None
    elif not (folder / SINGLE_FILE).is_file():
        other = sorted(p.name for p in folder.glob("*.bin")) or sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {other[0]}: re-save with save_pretrained(..., safe_serialization=True))" if other else ""
        raise ValueError(f"{str(folder)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in [SINGLE_FILE] if weight_map is None else sorted(set(weight_map.values())):
        path = folder / name
        if not path.is_file():
            raise ValueError(f"shard {name} listed in {INDEX_FILE} is missing from {str(folder)!r}; copy the "
                             "whole folder")
        try:
            tensors.update(load_file(str(path)))
        except SafetensorError as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err}); re-download or re-save it") from None
    absent = sorted(set(weight_map or ()) - set(tensors))
    if absent:
        raise ValueError(f"weight {absent[0]} is listed in {INDEX_FILE} as in {weight_map[absent[0]]} "
                         "but is not there; the shards do not belong together")
    return tensors


def nanoseek_state_dict(tensors: dict[str, torch.Tensor], cfg: ModelConfig, hf: dict,
                        expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers tensors -> a nanoseek state dict with exactly the keys and shapes of `expected` (experts stacked,
    rotate-half rope rows reordered, zero biases and empty shared experts dropped). ValueError names the first
    tensor that is unknown, missing, non-zero where nanoseek has nothing, or of the wrong shape."""
    model_type = hf["model_type"]
    v3_halves = model_type == "deepseek_v3" and hf.get("rope_interleave") is False
    transforms = ROTATE_HALF_TRANSFORMS[cfg.attention] if model_type in ("llama", "qwen3") or v3_halves else {}
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    skipped_mtp = []
    for hf_name, tensor in tensors.items():
        layer = _LAYER.match(hf_name)
        if layer and int(layer.group(1)) >= cfg.n_layers:  # DeepSeek's MTP layers follow the main ones
            skipped_mtp.append(hf_name)
            continue
        if hf_name.endswith("rotary_emb.inv_freq") or (hf_name == "lm_head.weight" and cfg.tie_embeddings):
            continue  # a buffer some older checkpoints carry (recomputed); a head tied to the embedding
        if hf_name.endswith(".bias"):
            if bool(torch.count_nonzero(tensor)):
                raise ValueError(f"weight {hf_name} {tuple(tensor.shape)} is a non-zero bias; nanoseek's attention "
                                 "and MLP have no biases, so this model cannot be imported exactly")
            continue
        mapped = from_hf_name(hf_name, model_type)
        if mapped is None:
            raise ValueError(f"weight {hf_name} {tuple(tensor.shape)} has no nanoseek counterpart in the "
                             f"{model_type} name table; this checkpoint has a part nanoseek does not know")
        name, expert = mapped
        if name not in expected:
            if tensor.numel() == 0:
                continue  # zero-width shared experts: transformers builds them even when there are none
            raise ValueError(f"weight {hf_name} {tuple(tensor.shape)} would be nanoseek's {name}, which this "
                             f"config ({CONFIG_FILE}) does not have; the config and the weights disagree")
        if expert is not None:
            experts.setdefault(name, {})[expert] = tensor
            continue
        transform = next((fn for suffix, fn in transforms.items() if name.endswith(suffix)), None)
        if transform is not None and tensor.shape == expected[name].shape:  # a wrong shape is reported below
            tensor = transform(tensor, cfg)
        state[name] = tensor
    if skipped_mtp:
        warnings.warn(f"{len(skipped_mtp)} tensors of layers >= num_hidden_layers={cfg.n_layers} (multi-token "
                      f"prediction, e.g. {skipped_mtp[0]}) are not imported", stacklevel=3)
    for name, slices in experts.items():
        state[name] = _stacked_experts(name, slices, expected[name].shape[0], model_type)
    if cfg.tie_embeddings and "embed.weight" in state:
        state["head.weight"] = state["embed.weight"]
    if model_type == "deepseek_v2":  # softmax routing has no correction bias: nanoseek's stays inert at 0
        state |= {name: torch.zeros_like(t) for name, t in expected.items() if name.endswith("gate.balance_bias")}
    _check_complete(state, expected, model_type)
    return state


def _stacked_experts(name: str, slices: dict[int, torch.Tensor], n: int, model_type: str) -> torch.Tensor:
    """Per-expert tensors {expert id: [...]} -> [n, ...] in expert order; ValueError for a gap or a mismatch."""
    for j in range(n):
        if j not in slices:
            raise ValueError(f"weight {to_hf_name(name, model_type, expert=j)} is missing (expert {j} of {n}); "
                             "the checkpoint is incomplete")
    shapes = {tuple(t.shape) for t in slices.values()}
    if len(shapes) > 1 or max(slices) >= n:
        raise ValueError(f"weights {to_hf_name(name, model_type, expert=0)}.. hold experts of shapes "
                         f"{sorted(shapes)} or more than {n} experts; they do not match {CONFIG_FILE}")
    return torch.stack([slices[j] for j in range(n)])


def _check_complete(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], model_type: str) -> None:
    for name, value in expected.items():
        hf_name = to_hf_name(name, model_type, expert=0 if name.endswith(STACKED_EXPERTS) else None)
        if name not in state:
            raise ValueError(f"weight {hf_name} (nanoseek {name}) is missing from the "
                             f"checkpoint; the folder is incomplete or its {CONFIG_FILE} describes a different model")
        if state[name].shape != value.shape:
            raise ValueError(f"weight {hf_name} has shape {tuple(state[name].shape)} but {CONFIG_FILE} implies "
                             f"{tuple(value.shape)} (nanoseek {name}); the config and the weights disagree")
