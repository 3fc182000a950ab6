"""`nanoseek check`: every preset, built at tiny width, must run forward, backward and cached decoding.

Each preset keeps its structure (attention kind, low-rank query, MoE and its expert groups, MTP, tied
embeddings, router scoring, RoPE scaling) and shrinks only its sizes: seconds on a CPU, every code path."""

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from nanoseek.config import PRESETS, ModelConfig
from nanoseek.generate import GREEDY, generate
from nanoseek.model import Transformer


def tiny_variant(cfg: ModelConfig) -> ModelConfig:
    """The same architecture at tiny sizes."""
    groups = cfg.n_expert_groups
    experts = groups * max(1, min(cfg.n_routed_experts, 8) // groups) if cfg.n_routed_experts else 0
    n_heads = min(cfg.n_heads, 4)
    kv = ({"n_kv_heads": max(1, n_heads * (cfg.n_kv_heads or cfg.n_heads) // cfg.n_heads), "head_dim": 16,
           "kv_head_ratio": None, "embd_scale": 1.0} if cfg.attention == "gqa" else {})
    return dataclasses.replace(
        cfg, vocab_size=128, dim=64, n_layers=min(cfg.n_layers, cfg.n_dense_layers + 2), n_heads=n_heads,
        max_seq_len=64, q_lora_rank=32 if cfg.q_lora_rank else 0, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, inter_dim=128, n_routed_experts=experts,
        n_activated_experts=min(cfg.n_activated_experts, max(experts, 1)), moe_inter_dim=32,
        rope_original_max_seq_len=min(cfg.rope_original_max_seq_len, 32), derived={}, **kv)


@dataclass
class CheckResult:
    preset: str
    ok: bool
    params: int
    seconds: float
    detail: str  # what failed, or a summary of what ran

    def row(self) -> str:
        status = "pass" if self.ok else "FAIL"
        return f"{self.preset:<20} {status:<5} {self.params:>9,} {self.seconds:6.2f}s  {self.detail}"


def check_config(name: str, cfg: ModelConfig, device: str | torch.device = "cpu", seed: int = 0) -> CheckResult:
    """Forward + backward (finite loss, finite gradients reaching every trained parameter) and 20 tokens
    of cached greedy decoding that agree with a full re-forward."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    try:
        model = Transformer(cfg).to(device)
        params = model.num_params()
        idx = torch.randint(0, cfg.vocab_size, (2, 33 + cfg.mtp_depth), device=device)
        out = model(idx[:, :32], idx[:, 1:])  # targets reach mtp_depth tokens further, as the loader's do
        loss = float(out.loss.detach())
        if not math.isfinite(loss):
            return CheckResult(name, False, params, time.perf_counter() - start, f"forward: loss {loss}")
        out.loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad or missing:
            what = f"non-finite grad in {bad[0]}" if bad else f"no grad reaches {missing[0]}"
            return CheckResult(name, False, params, time.perf_counter() - start, f"backward: {what}")
        model.eval()
        prompt = idx[:1, :8]
        tokens = generate(model, prompt, 20, GREEDY)
        if (mismatch := _cache_mismatch(model, tokens, prompt.shape[1])) is not None:
            return CheckResult(name, False, params, time.perf_counter() - start,
                               f"decode: cached token {mismatch} differs from a full re-forward")
        detail = (f"{cfg.attention}{' + MoE' if cfg.n_routed_experts else ''}"
                  f"{f' + MTP x{cfg.mtp_depth}' if cfg.mtp_depth else ''}: loss {loss:.3f}, "
                  f"{tokens.shape[1] - prompt.shape[1]} tokens decoded")
        return CheckResult(name, True, params, time.perf_counter() - start, detail)
    except Exception as err:  # a check reports every failure, whatever it is
        return CheckResult(name, False, 0, time.perf_counter() - start, f"{type(err).__name__}: {err}")


def _cache_mismatch(model: Transformer, tokens: torch.Tensor, prompt_len: int) -> int | None:
    """Index of the first generated token that is not the full forward's argmax (near-ties excused: a
    token whose logit is within 1e-4 of the best one is rounding, not a cache bug)."""
    with torch.no_grad():
        logits = model(tokens).logits[0, prompt_len - 1:-1].float()  # [n, vocab]: predicts each new token
    generated = tokens[0, prompt_len:]  # [n]
    gaps = logits.max(-1).values - logits.gather(1, generated[:, None]).squeeze(1)  # [n], >= 0
    bad = (gaps > 1e-4).nonzero().flatten().tolist()  # one host read
    return bad[0] if bad else None


def check_presets(names: list[str] | None = None, device: str | torch.device = "cpu") -> list[CheckResult]:
    names = names or list(PRESETS)
    if unknown := [n for n in names if n not in PRESETS]:
        raise ValueError(f"unknown preset {unknown[0]!r}; choose from {', '.join(PRESETS)}")
    return [check_config(name, tiny_variant(ModelConfig.from_preset(name)), device) for name in names]
