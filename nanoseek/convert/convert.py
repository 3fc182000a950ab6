"""Convert a dense GQA Transformer (Llama, SmolLM2, ...) into an MLA (+ DeepSeekMoE) Transformer, layer by layer
from the dense model's activations on calibration tokens, and measure what changed.

Exact with one KV group, every RoPE pair kept, a latent of rank >= dim and all routed experts active (or upcycled
ones), up to attn_norm's eps. Otherwise lost: the pairs partial RoPE stops rotating (MHA2MLA's main loss), what
G > 1 groups' keys do not share per frequency, the truncated latent, the latent RMSNorm's per-token scale, and
top-k routing over split experts."""

import copy
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from nanoseek.config import ModelConfig
from nanoseek.convert.heal import compare
from nanoseek.convert.mla import (RopeChoice, choose_rope_pairs, convert_attention, pair_scores, relative_error,
                                  rope_config)
from nanoseek.convert.moe import split_mlp, upcycle_mlp
from nanoseek.convert.rorope import convert_attention_rorope
from nanoseek.model import Transformer, eval_mode
from nanoseek.model.moe import MoE, expert_counts


@dataclass
class LayerReport:
    layer: int
    rope_kept: float  # share of this layer's query/key 2-norm score in the kept RoPE pairs
    rope_error: float  # energy share of the kept pairs' keys the shared rope key misses
    svd_error: float  # relative Frobenius error of the rank-R [W_k(nope); W_v]
    kv_error: float  # relative error of NoPE keys and values on calibration tokens (kv_norm included)
    attn_error: float  # relative error of the attention output on calibration inputs
    expert_load: list[float] | None = None  # fraction of tokens per routed expert (sums to top_k)
    ffn_error: float | None = None  # relative error of the MoE output vs the dense MLP's on calibration inputs

    def line(self) -> str:
        text = (f"layer {self.layer:3d}: attn out rel err {self.attn_error:.3e} | rope kept {self.rope_kept:.1%}, "
                f"shared-key miss {self.rope_error:.2%} | latent svd err {self.svd_error:.3e}, "
                f"kv err {self.kv_error:.3e}")
        if self.ffn_error is not None:
            text += f" | moe out rel err {self.ffn_error:.3e}"
        if self.expert_load is not None:
            text += f" | load max/mean {max(self.expert_load) / (sum(self.expert_load) / len(self.expert_load)):.2f}"
        return text


@dataclass
class ConversionReport:
    config: dict  # the converted ModelConfig as a dict
    rope: dict  # RopeChoice fields and the rope config that expresses them
    kv_values_per_token: tuple[int, int]  # per layer: (original, converted)
    layers: list[LayerReport] = field(default_factory=list)
    comparison: dict | None = None  # heal.Comparison.as_dict() on held-out tokens

    def lines(self) -> list[str]:
        before, after = self.kv_values_per_token
        rope = self.rope
        out = [f"rope: kept pairs {rope['pairs']} (offset {rope['offset']}, stride {rope['stride']}): "
               f"{rope['kept_score']:.1%} of the 2-norm score (best unconstrained {rope['best_score']:.1%}); "
               f"rope_theta {rope['rope_theta']:.6g}, linear factor {rope['rope_factor']:.6g}",
               f"KV cache per token per layer: {before} -> {after} values ({self.cache_change()})"]
        out += [layer.line() for layer in self.layers]
        if self.comparison:
            c = self.comparison
            out.append(f"held-out ({c['tokens']} tokens): KL(original || converted) {c['kl']:.4f} nats/token, "
                       f"perplexity {c['ppl_teacher']:.3f} -> {c['ppl_student']:.3f}, top-1 agreement {c['top1']:.1%}")
        return out

    @property
    def kv_cache_saving(self) -> float:
        """Fraction of per-token KV cache values saved: 1 - (R + Dr) / (2 G D)."""
        before, after = self.kv_values_per_token
        return 1.0 - after / before

    def cache_change(self) -> str:
        saving = self.kv_cache_saving
        return f"{saving:.1%} smaller" if saving >= 0 else f"{-saving:.1%} larger"

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "kv_cache_saving": self.kv_cache_saving}


def _log_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def target_config(dense: ModelConfig, kv_lora_rank: int, rope_dims: int, n_routed_experts: int,
                  n_shared_experts: int, n_activated_experts: int, moe: str, n_dense_layers: int,
                  choice: RopeChoice | None = None, method: str = "partial", kv_latent_norm: bool = True,
                  router_std: float = 0.02) -> ModelConfig:
    """The converted model's config (validated: a bad source or option fails here, before any work)."""
    if dense.attention != "gqa":
        raise ValueError(f"attention={dense.attention!r}: convert takes a GQA/MHA/MQA model (a Llama-style one); "
                         "this one is already MLA")
    if dense.uses_moe:
        raise ValueError(f"n_routed_experts={dense.n_routed_experts}: convert takes a dense model")
    if dense.qk_norm:
        raise ValueError("qk_norm=True: a per-head query/key RMSNorm before RoPE has no MLA equivalent; "
                         "convert a model without QK-norm")
    if dense.rope_scaling not in ("none", "linear"):
        raise ValueError(f"rope_scaling={dense.rope_scaling!r}: YaRN's per-frequency blend cannot be re-expressed "
                         "over a subset of frequencies; convert a model with rope_scaling 'none' or 'linear'")
    head_dim = dense.head_dim
    if not isinstance(rope_dims, int) or rope_dims < 2 or rope_dims % 2 or rope_dims > head_dim:
        raise ValueError(f"rope_dims={rope_dims!r}: must be an even number in [2, head_dim={head_dim}]")
    if method not in ("rorope", "partial"):
        raise ValueError(f"method={method!r}: choose 'rorope' (every kept frequency's shared component, the rest "
                         "as NoPE) or 'partial' (partial RoPE, the other pairs' rotation dropped)")
    if moe not in ("split", "upcycle"):
        raise ValueError(f"moe={moe!r}: choose 'split' (fine-grained experts) or 'upcycle' (copies)")
    parts = n_shared_experts + n_routed_experts if n_routed_experts and moe == "split" else 1  # of the dense MLP
    if dense.inter_dim % parts:
        raise ValueError(f"inter_dim={dense.inter_dim} is not divisible by shared + routed experts = {parts}: "
                         "choose counts whose sum divides it, or --moe upcycle")
    theta, factor = dense.rope_theta, dense.rope_factor if dense.rope_scaling == "linear" else 1.0
    if choice is not None:
        theta, factor = rope_config(theta, factor, head_dim, choice)
    return ModelConfig(**dense.to_dict() | dict(
        attention="mla", n_kv_heads=None, head_dim=None, kv_head_ratio=None, embd_scale=1.0, qk_norm=False,
        q_lora_rank=0, kv_lora_rank=kv_lora_rank, kv_latent_norm=kv_latent_norm,
        qk_nope_head_dim=head_dim if method == "rorope" else head_dim - rope_dims,
        qk_rope_head_dim=rope_dims, v_head_dim=head_dim,
        rope_theta=theta, rope_scaling="linear" if factor != 1.0 else "none", rope_factor=factor,
        n_routed_experts=n_routed_experts, n_shared_experts=n_shared_experts if n_routed_experts else 0,
        n_activated_experts=n_activated_experts if n_routed_experts else 1, moe_inter_dim=dense.inter_dim // parts,
        # split: each picked expert gets weight ~1 (top-k weights sum to route_scale); upcycle: they sum to 1.
        route_scale=float(n_activated_experts) if moe == "split" else 1.0, score_func="sigmoid",
        # DeepSeek-V3's bias step 0.001 suits sigmoid scores spread over (0, 1); a converted router's spread by only
        # ~router_std / 4 (the sigmoid's slope at 0): ~200 steps of steady over-load move a bias by one such spread.
        n_expert_groups=1, n_limited_groups=1, balance_rate=router_std / 4 / 200,
        n_dense_layers=min(n_dense_layers, dense.n_layers), mtp_depth=0))


@torch.no_grad()
def collect_inputs(model: Transformer, ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per layer, `resid` (attn_norm input), `attn_out` and `ffn_in` (MLP input) on ids [B, T]: [B, T, dim] on CPU."""
    records: list[dict[str, list[torch.Tensor]]] = [{} for _ in model.layers]
    handles = []
    for i, block in enumerate(model.layers):
        def keep(name, index=i, output=False):
            def hook(module, args, result=None):
                records[index].setdefault(name, []).append((result if output else args[0]).detach().float().cpu())
            return hook
        handles.append(block.attn_norm.register_forward_pre_hook(keep("resid")))
        handles.append(block.attn.register_forward_hook(keep("attn_out", output=True)))
        handles.append(block.ffn.register_forward_pre_hook(keep("ffn_in")))
    _run_trunk(model, ids, handles)
    return [{name: torch.cat(parts) for name, parts in rec.items()} for rec in records]


def _run_trunk(model: Transformer, ids: torch.Tensor, hooks: list) -> None:
    """Embeddings and blocks only (the hooks want the activations; a vocabulary-sized head over thousands of
    tokens would only cost memory), in eval mode, 8 rows of ids [B, T] at a time; removes the hooks after."""
    try:
        with eval_mode(model):
            for start in range(0, ids.shape[0], 8):
                x = model.embed(ids[start:start + 8].to(model.embed.weight.device))
                for block in model.layers:
                    x = block(x)
    finally:
        for hook in hooks:
            hook.remove()


def _unit_rms(resid: torch.Tensor, eps: float) -> torch.Tensor:
    """What attn_norm computes before its weight: [..., dim] -> float64 [..., dim] at unit RMS."""
    x = resid.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def convert_to_mla_moe(dense: Transformer, calib_ids: torch.Tensor, *, kv_lora_rank: int, rope_dims: int,
                       n_routed_experts: int = 0, n_shared_experts: int = 1, n_activated_experts: int = 2,
                       moe: Literal["split", "upcycle"] = "split", n_dense_layers: int = 1, router_std: float = 0.02,
                       latent_init: Literal["activations", "weights"] = "activations",
                       method: Literal["rorope", "partial"] = "rorope", kv_latent_norm: bool = True,
                       eval_ids: torch.Tensor | None = None, seed: int = 0,
                       log: Callable[[str], None] | None = _log_stderr) -> tuple[Transformer, ConversionReport]:
    """dense GQA Transformer (left untouched) -> (MLA Transformer on CPU in its dtype, eval mode; ConversionReport).

    calib_ids: [B, T] token ids whose activations drive every fitted choice (a few thousand tokens of ordinary text).
    method: "rorope" (rorope.py) or "partial" (mla.py; latent_init picks its SVD). n_routed_experts=0 keeps MLPs dense.
    kv_latent_norm: False drops the latent RMSNorm (transformers' export adds it back).
    eval_ids: optional held-out ids [B, T] (or 1-D) for the KL / perplexity comparison (heal.compare)."""
    src = dense.config
    _check_options(calib_ids, eval_ids, latent_init, method, router_std)
    options = (kv_lora_rank, rope_dims, n_routed_experts, n_shared_experts, n_activated_experts, moe, n_dense_layers)
    target_config(src, *options, None, method, kv_latent_norm)  # fail on a bad source or options before any work
    say = log or (lambda line: None)
    records = collect_inputs(dense, calib_ids)
    scores = _pair_scores(dense.layers, records, src)  # [L, P]
    choice = choose_rope_pairs(scores.sum(0), rope_dims // 2)
    cfg = target_config(src, *options, choice, method, kv_latent_norm, router_std)
    model = Transformer(cfg).to(dense.embed.weight.dtype)
    model.load_state_dict({k: v for k, v in dense.state_dict().items()
                           if k in ("embed.weight", "norm.weight", "head.weight")}, strict=False)
    report = ConversionReport(
        config=cfg.to_dict(),
        rope={**dataclasses.asdict(choice), "pairs": choice.pairs, "rope_theta": cfg.rope_theta,
              "rope_factor": cfg.rope_factor},
        kv_values_per_token=(src.kv_cache_values_per_token(), cfg.kv_cache_values_per_token()))
    for line in report.lines()[:2]:
        say(line)
    for i, (old, new, rec) in enumerate(zip(dense.layers, model.layers, records)):
        u = _unit_rms(rec["resid"], src.norm_eps)  # [B, T, dim]
        weights = _convert_attention(old, new, u, src, cfg, choice.pairs, method, latent_init == "activations")
        layer = LayerReport(i, float(scores[i, choice.pairs].sum()), weights.rope_error, weights.svd_error,
                            weights.kv_error, _attention_error(new.attn, u, rec["attn_out"]))
        layer.ffn_error = _convert_ffn(old.ffn, new.ffn, rec["ffn_in"].flatten(0, 1).double(), cfg, moe, router_std,
                                       seed + i)
        report.layers.append(layer)
        say(layer.line())
    model.eval()
    loads = _expert_loads(model, eval_ids if eval_ids is not None else calib_ids)
    for layer in report.layers:
        layer.expert_load = loads.get(layer.layer)
    if loads:
        say("initial expert loads (fraction of tokens per routed expert): " + "; ".join(
            f"layer {i}: " + " ".join(f"{x:.2f}" for x in load) for i, load in loads.items()))
    if eval_ids is not None:
        report.comparison = compare(dense, model, eval_ids).as_dict()
        say(report.lines()[-1])
    return model, report


def _check_options(calib_ids: torch.Tensor, eval_ids: torch.Tensor | None, latent_init: str, method: str,
                   router_std: float) -> None:
    if calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise ValueError(f"calib_ids has shape {tuple(calib_ids.shape)}: pass token ids [batch, seq_len]")
    if eval_ids is not None and eval_ids.numel() < 2:  # compare() scores next tokens: it needs two
        raise ValueError(f"eval_ids holds {eval_ids.numel()} tokens: give at least 2 held-out tokens "
                         "(--eval-tokens, or more text in --data)")
    if latent_init not in ("activations", "weights"):
        raise ValueError(f"latent_init={latent_init!r}: choose 'activations' or 'weights'")
    if method == "rorope" and latent_init != "activations":
        raise ValueError(f"latent_init={latent_init!r} applies to method='partial'; method='rorope' always takes "
                         "the latent from the calibration activations")
    if router_std <= 0:
        raise ValueError(f"router_std={router_std}: must be > 0 (the spread of the initial router logits)")


def _pair_scores(layers: torch.nn.ModuleList, records: list[dict[str, torch.Tensor]], src: ModelConfig) -> torch.Tensor:
    """MHA2MLA's 2-norm score per layer and frequency pair, each layer normalised to sum 1: [L, P] (one rope config
    serves every layer, so the pairs are chosen on the sum)."""
    scores = []
    for block, rec in zip(layers, records):
        weight = block.attn_norm.weight.double().cpu()
        u = _unit_rms(rec["resid"].flatten(0, 1), src.norm_eps)
        s = pair_scores(block.attn.wq.weight.double().cpu() * weight, block.attn.wk.weight.double().cpu() * weight,
                        u, src.n_heads, src.n_kv_heads)
        scores.append(s / s.sum().clamp(min=1e-30))
    return torch.stack(scores)


def _convert_attention(old: torch.nn.Module, new: torch.nn.Module, windows: torch.Tensor, src: ModelConfig,
                       cfg: ModelConfig, pairs: list[int], method: str, weighted: bool):
    """Fill block `new`'s attention and norms from dense block `old`; windows: [B, T, dim] at unit RMS."""
    u = windows.flatten(0, 1)
    dense = (old.attn.wq, old.attn.wk, old.attn.wv, old.attn.wo, old.attn_norm)
    args = (*(m.weight.double().cpu() for m in dense), u, src.n_heads, src.n_kv_heads, pairs, cfg.kv_lora_rank,
            cfg.norm_eps)
    weights = (convert_attention_rorope(*args, kv_norm=cfg.kv_latent_norm) if method == "rorope"
               else convert_attention(*args, weighted))
    new.attn_norm.weight.fill_(1.0)  # folded into the projections
    for name in ("wq", "wkv_a", "wkv_b", "wo"):
        getattr(new.attn, name).weight.copy_(getattr(weights, name))
    if cfg.kv_latent_norm:
        # The latent norm's gain (one fitted scalar, often far from 1) goes into wkv_b's columns: exact, and the
        # norm's weight stays 1 as in a model trained from scratch. Left in the norm it multiplies what every Adam
        # step on wkv_b does (Adam moves each weight by ~lr whatever its scale): see bench/RESULTS.md, healing.
        new.attn.wkv_b.weight.mul_(weights.kv_norm.to(new.attn.wkv_b.weight.dtype))  # [rows, R] * [R]
        new.attn.kv_norm.weight.fill_(1.0)
    else:  # what an export's (always present) latent norm will scale back to
        latent = u @ weights.wkv_a[:cfg.kv_lora_rank].T  # [N, R]
        new.attn.latent_rms.fill_(float(latent.pow(2).mean(-1).sqrt().mean()))
    new.ffn_norm.weight.copy_(old.ffn_norm.weight)
    return weights


@torch.no_grad()
def _attention_error(attn: torch.nn.Module, u: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative error of the converted attention (run in float64) on the calibration inputs u [B, T, dim]."""
    return relative_error(copy.deepcopy(attn).double().eval()(u), reference.double())


def _convert_ffn(old: torch.nn.Module, new: torch.nn.Module, x: torch.Tensor, cfg: ModelConfig, moe: str,
                 router_std: float, seed: int) -> float | None:
    """Fill `new` (dense MLP or MoE) from dense `old`; x: [N, dim]. -> the MoE output's relative error, or None."""
    if not isinstance(new, MoE):
        new.load_state_dict(old.state_dict())
        return None
    w1, w2, w3 = (getattr(old, n).weight.double().cpu() for n in ("w1", "w2", "w3"))
    if moe == "split":
        weights = split_mlp(w1, w2, w3, x, cfg.n_shared_experts, cfg.n_routed_experts, cfg.n_activated_experts,
                            router_std, seed)
    else:
        weights = upcycle_mlp(w1, w2, w3, x, cfg.n_shared_experts, cfg.n_routed_experts, router_std, seed)
    for name in ("w1", "w2", "w3"):
        getattr(new.experts, name).copy_(getattr(weights, name))
        if new.shared_experts is not None:
            getattr(new.shared_experts, name).weight.copy_(getattr(weights, f"shared_{name}"))
    new.gate.weight.copy_(weights.gate)  # its balance_bias stays at the 0 it starts from
    out = copy.deepcopy(new).double().eval()(x[None])
    return relative_error(out[0] if isinstance(out, tuple) else out, copy.deepcopy(old).double().eval()(x[None]))


def _expert_loads(model: Transformer, ids: torch.Tensor) -> dict[int, list[float]]:
    """Fraction of tokens routed to each expert per MoE layer (sums to top_k) on ids [B, T] or [N]."""
    counts: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.layers):
        if isinstance(block.ffn, MoE):
            def hook(module, args, result, index=i):
                counts[index] = counts.get(index, 0) + expert_counts(result[1].flatten(), module.n_experts).double()
            handles.append(block.ffn.gate.register_forward_hook(hook))
    if not handles:
        return {}
    if ids.dim() == 1:
        seq_len = min(model.config.max_seq_len, 256, ids.numel())
        ids = ids[:ids.numel() // seq_len * seq_len].view(-1, seq_len)
    _run_trunk(model, ids, handles)
    return {i: (c / ids.numel()).tolist() for i, c in sorted(counts.items())}
