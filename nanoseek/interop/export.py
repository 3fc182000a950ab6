"""Export a nanoseek Transformer as a transformers folder (config.json + safetensors) that loads with the same logits.

MLA becomes DeepseekV3, or DeepseekV2 with softmax-routed MoE (no correction bias, top-k weights not renormalised);
dense GQA becomes Llama, or Qwen3 with qk_norm; GQA + MoE is refused (no transformers model matches it exactly).
The config carries RoPE in both forms (4.x `rope_theta`/`rope_scaling`, 5.x `rope_parameters`) and the DeepSeek
keys transformers ignores but vLLM reads (`scoring_func`, ...); experts are written one tensor each, the layout
transformers 4.x, 5.x and vLLM all load; MTP modules are training-only and not exported."""

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.interop.names import (CONFIG_FILE, INDEX_FILE, ROPE_ROWS, SINGLE_FILE, STACKED_EXPERTS,
                                    interleaved_to_halves, resolve_dtype, to_hf_name)
from nanoseek.model.layers import _yarn_mscale, yarn_attention_factor
from nanoseek.train.distributed import unwrap
from nanoseek.train.loading import load_model

ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                 "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# transformers builds DeepSeek's latent norms (q_a_layernorm, kv_a_layernorm) with this eps, whatever
# rms_norm_eps says (vLLM uses rms_norm_eps): only this value makes nanoseek, transformers and vLLM agree.
HF_LATENT_NORM_EPS = 1e-6
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3
_OUR_WEIGHT_FILES = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?\Z")


def hf_model_type(cfg: ModelConfig) -> str:
    """The transformers `model_type` a model with this config exports to; ValueError if none matches exactly."""
    if cfg.attention == "mla":
        if cfg.uses_moe and cfg.score_func == "softmax":
            if cfg.dim % cfg.n_heads:
                raise ValueError(f"dim={cfg.dim} is not divisible by n_heads={cfg.n_heads}: transformers' DeepseekV2 "
                                 "(the softmax-routing export) rejects that config; choose dim a multiple of n_heads "
                                 "or score_func='sigmoid' (DeepseekV3)")
            return "deepseek_v2"
        if cfg.uses_moe and cfg.n_routed_experts < 2:
            raise ValueError(f"n_routed_experts={cfg.n_routed_experts}: transformers' DeepseekV3 router scores a "
                             "group by its top-2 experts and needs >= 2 routed experts")
        return "deepseek_v3"
    if cfg.uses_moe:
        raise ValueError(f"attention='gqa' with n_routed_experts={cfg.n_routed_experts}: no transformers architecture "
                         "has GQA attention with DeepSeek-style MoE routing; export a dense GQA model "
                         "(n_routed_experts=0) or an MLA model")
    if not cfg.qk_norm and cfg.dim % cfg.n_heads:
        raise ValueError(f"dim={cfg.dim} is not divisible by n_heads={cfg.n_heads}: transformers' Llama rejects "
                         "that config; choose dim a multiple of n_heads")
    return "qwen3" if cfg.qk_norm else "llama"


def export_files(out_dir: Path) -> set[str]:
    """The files an earlier export (or a transformers folder) in `out_dir` holds that a new export replaces."""
    if not (out_dir / CONFIG_FILE).is_file():
        return set()
    fixed = {CONFIG_FILE, "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    return fixed | {p.name for p in out_dir.iterdir() if _OUR_WEIGHT_FILES.match(p.name)}


def export_hf(model: nn.Module | str | Path, out_dir: str | Path, tokenizer=None,
              dtype: torch.dtype | str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write `model` (a Transformer, or a checkpoint/run directory) as a folder that
    `transformers.AutoModelForCausalLM.from_pretrained` loads; returns the folder. tokenizer: optional, one with
    `to_hf_files(dir, model_max_length)` (nanoseek's). dtype: on disk ("fp32"/"bf16"/"fp16" or a torch dtype;
    None keeps the model's); the MoE bias stays float32."""
    if isinstance(model, (str, Path)):
        model, _ = load_model(model)
    model = unwrap(model)  # torch.compile / DDP wrappers: their state-dict names carry prefixes
    cfg: ModelConfig = model.config
    model_type = hf_model_type(cfg)
    own_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    dtype = own_dtype if dtype is None else resolve_dtype(dtype)
    _check_numerics(model, cfg, model_type)
    vocab = getattr(tokenizer, "vocab_size", None)
    if vocab is not None and vocab > cfg.vocab_size:
        raise ValueError(f"tokenizer vocab_size={vocab} is larger than the model's vocab_size={cfg.vocab_size}: "
                         "this tokenizer does not belong to this model")
    tensors = hf_state_dict(model, model_type, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():  # an earlier export's shards would shadow or mix with these
        if _OUR_WEIGHT_FILES.match(stale.name):
            stale.unlink()
    bos_id = eos_id = None
    if tokenizer is not None and not hasattr(tokenizer, "to_hf_files"):
        warnings.warn(f"tokenizer {type(tokenizer).__name__} has no to_hf_files(); exported without tokenizer files",
                      stacklevel=2)
    elif tokenizer is not None:
        try:
            tokenizer.to_hf_files(out, model_max_length=cfg.max_seq_len)
        except ValueError as err:  # e.g. a char tokenizer: the weights are still worth having
            warnings.warn(f"tokenizer not exported: {err}", stacklevel=2)
        else:  # nanoseek's tokenizer_config uses the end-of-text token as bos too
            bos_id = eos_id = getattr(tokenizer, "eos_id", None)
    config = hf_config(cfg, model_type, dtype, bos_token_id=bos_id, eos_token_id=eos_id)
    _write_safetensors(tensors, out, max_shard_bytes)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if eos_id is not None:
        generation = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out


@torch.no_grad()
def hf_state_dict(model: nn.Module, model_type: str | None = None,
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """nanoseek state dict -> transformers tensors (CPU, contiguous, one per expert, GQA rope rows rotate-half), MTP
    dropped. A MoE layer without shared experts gets zero-width ones: transformers always builds that MLP."""
    cfg: ModelConfig = model.config
    model_type = model_type or hf_model_type(cfg)
    out: dict[str, torch.Tensor] = {}

    def put(name: str, tensor: torch.Tensor, keep_fp32: bool = False) -> None:
        tensor = tensor.detach().to("cpu", torch.float32 if keep_fp32 else (dtype or tensor.dtype))
        out[name] = tensor.contiguous().clone()  # own storage: safetensors refuses shared tensors

    for name, tensor in model.state_dict().items():
        if name.startswith("mtp.") or (name == "head.weight" and cfg.tie_embeddings):
            continue
        if name.endswith(STACKED_EXPERTS):
            for j in range(tensor.shape[0]):
                put(to_hf_name(name, model_type, expert=j), tensor[j])
            continue
        if name.endswith("gate.balance_bias") and model_type == "deepseek_v2":
            continue  # checked inert by _check_numerics
        if name.endswith("attn.latent_rms"):  # no latent norm here; transformers always has one (_check_numerics)
            put(to_hf_name(name.replace("latent_rms", "kv_norm.weight"), model_type), tensor.expand(cfg.kv_lora_rank))
            continue
        hf_name = to_hf_name(name, model_type)
        if hf_name is None:
            raise ValueError(f"no transformers {model_type} name for nanoseek tensor {name!r} {tuple(tensor.shape)}; "
                             "this model has a part the export does not know")
        if cfg.attention == "gqa" and name.endswith(ROPE_ROWS):
            tensor = interleaved_to_halves(tensor, cfg.head_dim)
        put(hf_name, tensor, keep_fp32=name.endswith("balance_bias"))
    if cfg.uses_moe and cfg.n_shared_experts == 0:
        for i in range(cfg.n_dense_layers, cfg.n_layers):
            for proj, shape in (("gate_proj", (0, cfg.dim)), ("up_proj", (0, cfg.dim)), ("down_proj", (cfg.dim, 0))):
                put(f"model.layers.{i}.mlp.shared_experts.{proj}.weight", torch.zeros(shape))
    return out


def _write_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0  # of the last shard
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][name] = tensor
        size += nbytes
    n = len(shards)
    files = [SINGLE_FILE] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    for file, shard in zip(files, shards):
        save_file(shard, str(out / file), metadata={"format": "pt"})
    if n > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {name: file for file, shard in zip(files, shards) for name in shard}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def hf_config(cfg: ModelConfig, model_type: str | None = None, dtype: torch.dtype = torch.float32,
              bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict:
    """The config.json dict for `cfg` (see ecosystem.md section 1.2 for the DeepSeek template)."""
    model_type = model_type or hf_model_type(cfg)
    dtype_name = str(dtype).removeprefix("torch.")
    config = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "attention_dropout": 0.0, "initializer_range": cfg.init_std, "use_cache": True,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None, **_rope_config(cfg),
        "torch_dtype": dtype_name, "dtype": dtype_name,  # transformers 4.x, 5.x
    }
    if not model_type.startswith("deepseek"):
        config.update({"num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "mlp_bias": False})
        if model_type == "qwen3":
            config.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers})
        return config
    moe, sigmoid = cfg.uses_moe, model_type == "deepseek_v3"
    topk_method = "noaux_tc" if sigmoid else "group_limited_greedy" if cfg.n_expert_groups > 1 else "greedy"
    return {
        **config,
        # MLA: every head has its own K/V from the latent, so there are as many KV heads as query heads.
        "num_key_value_heads": cfg.n_heads, "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "head_dim": cfg.qk_rope_head_dim,  # what transformers 5.x derives and saves
        "rope_interleave": True,  # nanoseek's RoPE rotates (x[2i], x[2i+1]); vLLM assumes this layout
        # MoE. A dense model has every layer below first_k_dense_replace, so no router is ever built.
        "moe_intermediate_size": cfg.moe_inter_dim, "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts if moe else 0,
        "num_experts_per_tok": cfg.n_activated_experts if moe else 0, "routed_scaling_factor": cfg.route_scale,
        "first_k_dense_replace": cfg.n_dense_layers if moe else cfg.n_layers, "moe_layer_freq": 1,
        "norm_topk_prob": sigmoid,  # nanoseek renormalises sigmoid top-k weights only
        "n_group": cfg.n_expert_groups, "topk_group": cfg.n_limited_groups, "topk_method": topk_method,
        "scoring_func": "sigmoid" if sigmoid else "softmax",  # vLLM defaults to softmax when absent
        "ep_size": 1, "num_nextn_predict_layers": 0,  # MTP modules are training-only; not exported
    }


def _rope_config(cfg: ModelConfig) -> dict:
    """RoPE in transformers 5.x form (`rope_parameters`) and 4.x form (`rope_theta` + `rope_scaling`), with the
    same values: transformers 5.x prefers `rope_scaling` when both are present."""
    theta = float(cfg.rope_theta)
    if cfg.rope_scaling == "none":
        return {"rope_theta": theta, "rope_scaling": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    scaling: dict = {"factor": float(cfg.rope_factor)}
    if cfg.rope_scaling == "yarn":
        # YaRN's factor on cos/sin, written out, not inferred: transformers' inference drops `mscale` when
        # mscale_all_dim is 0, where DeepSeek's (and nanoseek's) formula keeps it. Llama/Qwen3 have no softmax-scale
        # mscale, so for GQA nanoseek's mscale(mscale_all_dim)^2 on the logits goes in here too: every GQA dim is
        # rotated, so scaling cos/sin by m scales each q.k logit by m^2.
        attention_factor = yarn_attention_factor(cfg)
        if cfg.attention == "gqa" and cfg.mscale_all_dim:
            attention_factor *= _yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
        scaling.update({"original_max_position_embeddings": cfg.rope_original_max_seq_len or cfg.max_seq_len,
                        "beta_fast": float(cfg.beta_fast), "beta_slow": float(cfg.beta_slow),
                        "attention_factor": float(attention_factor)})
        if cfg.attention == "mla":  # DeepSeek attention scales the softmax by mscale(mscale_all_dim)^2
            scaling.update({"mscale": float(cfg.mscale), "mscale_all_dim": float(cfg.mscale_all_dim)})
    kind = cfg.rope_scaling
    return {"rope_theta": theta,
            "rope_scaling": {"type": kind, "rope_type": kind, **scaling},
            "rope_parameters": {"rope_type": kind, "rope_theta": theta, **scaling}}


def _check_numerics(model: nn.Module, cfg: ModelConfig, model_type: str) -> None:
    """Refuse what transformers would compute differently; warn where it differs only slightly."""
    if model_type == "deepseek_v2":
        for name, module in model.named_modules():
            bias = getattr(module, "balance_bias", None)
            if bias is not None and bias.numel() and not name.startswith("mtp.") and bool(bias.max() != bias.min()):
                raise ValueError(
                    f"{name}.balance_bias is not uniform (range {bias.min().item():.4g}..{bias.max().item():.4g}): "
                    "softmax-routed models export to transformers' DeepseekV2, whose router has no correction bias, "
                    "so it would pick different experts. Train with balance_rate=0 (or score_func='sigmoid', "
                    "exported as DeepseekV3 with the bias), or zero the biases to accept the change in routing")
        if cfg.qk_nope_head_dim % 2 or cfg.kv_lora_rank % 2:
            # DeepseekV2 rotates with view_as_complex on slices of q and kv_a's output: an odd stride raises.
            warnings.warn(f"qk_nope_head_dim={cfg.qk_nope_head_dim}, kv_lora_rank={cfg.kv_lora_rank}: transformers' "
                          "DeepseekV2 fails in float32 when either is odd ('Tensor must have a stride divisible "
                          "by 2'); the export loads and runs in bfloat16/float16", stacklevel=3)
    if cfg.attention == "mla" and not cfg.kv_latent_norm:
        warnings.warn("kv_latent_norm=False: transformers' DeepseekV3/V2 always RMS-normalise the KV latent, so the "
                      "export gets kv_a_layernorm with the latent's typical RMS as its weight (set at conversion) and "
                      "its logits differ from nanoseek's wherever a token's latent RMS is not typical; measure the "
                      "gap (heal.compare) before relying on it", stacklevel=3)
    if cfg.attention == "mla" and cfg.norm_eps != HF_LATENT_NORM_EPS:
        warnings.warn(f"norm_eps={cfg.norm_eps}: transformers builds DeepSeek's latent norms (q_a_layernorm, "
                      f"kv_a_layernorm) with eps={HF_LATENT_NORM_EPS}, so its logits will differ slightly from "
                      "nanoseek's; train with norm_eps=1e-6 for an exact export", stacklevel=3)
    if cfg.swiglu_clamp > 0:
        warnings.warn(f"swiglu_clamp={cfg.swiglu_clamp}: transformers does not clamp SwiGLU pre-activations, so "
                      "its outputs differ wherever nanoseek's clamp was active", stacklevel=3)
