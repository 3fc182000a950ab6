"""Configuration: dataclasses validated before any tensor is made, presets, TOML I/O.

Every field name follows DESIGN.md's vocabulary (DeepSeek-V3's reference code where the concept exists
there). A bad value raises ``ValueError`` naming the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro


def _fail(field_name: str, value: Any, fix: str) -> None:
    raise ValueError(f"{field_name}={value!r}: {fix}")


def require_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            _fail(name, value, "must be a positive number")


def require_non_negative(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            _fail(name, value, "must be >= 0")


def _one_of(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        _fail(name, value, f"must be one of {', '.join(map(repr, choices))}")


@dataclass
class ModelConfig:
    """Shape and numerics of a Transformer. See README "Architecture" for what each preset is."""

    vocab_size: int = 2048
    """Vocabulary size (a run sets it from its tokenizer)."""
    dim: int = 128
    """Model width (residual stream)."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Attention (query) heads."""
    max_seq_len: int = 256
    """Longest context: RoPE tables and caches are this long."""
    attention: Literal["mla", "gqa"] = "mla"
    """mla: Multi-head Latent Attention (DeepSeek-V2); gqa: grouped-query attention (MHA and MQA included)."""
    n_kv_heads: int | None = None
    """GQA: key/value heads (default n_heads = MHA; 1 = MQA)."""
    head_dim: int | None = None
    """GQA: per-head width (default dim // n_heads)."""
    kv_head_ratio: float | None = None
    """GQA: derive n_kv_heads as n_heads * ratio (applied once, recorded in `derived`)."""
    embd_scale: float = 1.0
    """GQA: widen dim by this factor, spending the KV memory GQA saves on width."""
    q_lora_rank: int = 0
    """MLA: rank of the low-rank query projection (0: a plain query projection)."""
    kv_lora_rank: int = 64
    """MLA: width of the latent that keys and values are decompressed from (what the cache holds)."""
    qk_nope_head_dim: int = 32
    """MLA: per-head query/key dims without position (decompressed from the latent)."""
    qk_rope_head_dim: int = 16
    """MLA: per-head query dims with RoPE, against one rope key shared by all heads (cached)."""
    v_head_dim: int = 32
    """MLA: per-head value width."""
    inter_dim: int = 384
    """Hidden width of the dense SwiGLU MLP (every layer without MoE)."""
    n_dense_layers: int = 1
    """The first layers keep a dense MLP when MoE is on (DeepSeek's first_k_dense_replace)."""
    n_routed_experts: int = 8
    """MoE: routed experts per layer (0: dense everywhere)."""
    n_shared_experts: int = 1
    """MoE: experts every token goes through (DeepSeekMoE)."""
    n_activated_experts: int = 2
    """MoE: routed experts each token picks (top-k)."""
    moe_inter_dim: int = 96
    """MoE: hidden width of each expert (fine-grained experts are narrow)."""
    route_scale: float = 1.0
    """MoE: multiplier on the routing weights (DeepSeek-V3's routed_scaling_factor)."""
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    """MoE: router scores, sigmoid (DeepSeek-V3) or softmax (DeepSeek-V2)."""
    n_expert_groups: int = 1
    """MoE: expert groups for group-limited routing (1: off)."""
    n_limited_groups: int = 1
    """MoE: groups a token may route into."""
    balance_rate: float = 0.001
    """Auxiliary-loss-free balancing: bias update speed gamma (DeepSeek-V3 section 2.1.2 uses 0.001)."""
    aux_loss_coef: float = 0.0
    """Sequence-wise balance loss weight (DeepSeek-V3 eq. 17-20; 0: off)."""
    router_z_loss_coef: float = 0.0
    """Router z-loss weight (ST-MoE; 0: off)."""
    mtp_depth: int = 1
    """Multi-token prediction depth (DeepSeek-V3 section 2.2; 0: off)."""
    mtp_kind: Literal["modules", "shared"] = "modules"
    """modules: DeepSeek-V3's sequential MTP modules; shared: the main logits also scored 2..k tokens ahead."""
    mtp_weight: float = 0.3
    """Weight of the MTP losses in the total loss (DeepSeek-V3's lambda)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: Literal["none", "linear", "yarn"] = "none"
    """RoPE context extension: linear position interpolation or YaRN."""
    rope_factor: float = 1.0
    """Context extension factor (1: none)."""
    rope_original_max_seq_len: int = 0
    """YaRN: the context the model was trained on (0: max_seq_len)."""
    beta_fast: float = 32.0
    """YaRN ramp start (Peng et al. 2023; DeepSeek-V3's value)."""
    beta_slow: float = 1.0
    """YaRN ramp end."""
    mscale: float = 1.0
    """YaRN attention temperature factor."""
    mscale_all_dim: float = 0.0
    """YaRN: move the temperature into the softmax scale (DeepSeek-V3's mscale_all_dim)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    qk_norm: bool = False
    """GQA: RMSNorm on queries and keys per head (stabilises attention logits)."""
    tie_embeddings: bool = False
    """Share the embedding matrix with the output head."""
    dropout: float = 0.0
    """Dropout on attention outputs and residual branches."""
    init_std: float = 0.02
    """Std of the normal weight init."""
    qk_clip_threshold: float = 0.0
    """MLA QK-clip (Kimi K2, arXiv 2507.20534): rescale query/key weights of heads whose max logit exceeds this (0: off)."""
    logit_z_loss_coef: float = 0.0
    """Output-logit z-loss weight (PaLM, arXiv 2204.02311 section 5 uses 1e-4; 0: off)."""
    router_fp32: bool = True
    """Router scores in fp32 even under autocast (DeepSeek-V3, ST-MoE)."""
    swiglu_clamp: float = 0.0
    """Clamp SwiGLU pre-activations to +-this (opt-in; the clamped count is logged; 0: off)."""
    # What __post_init__ derived (kv_head_ratio, embd_scale), for the record; not a setting.
    derived: Annotated[dict, tyro.conf.Suppress] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        require_positive(self, "vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "rope_theta",
                  "norm_eps", "embd_scale", "inter_dim", "init_std")
        _one_of(self, "attention", ("mla", "gqa"))
        _one_of(self, "score_func", ("sigmoid", "softmax"))
        _one_of(self, "mtp_kind", ("modules", "shared"))
        _one_of(self, "rope_scaling", ("none", "linear", "yarn"))
        require_non_negative(self, "q_lora_rank", "n_dense_layers", "n_routed_experts", "n_shared_experts",
                      "route_scale", "balance_rate", "aux_loss_coef", "router_z_loss_coef",
                      "mtp_weight", "qk_clip_threshold", "logit_z_loss_coef", "swiglu_clamp",
                      "rope_original_max_seq_len", "mscale_all_dim")
        if not 0.0 <= self.dropout < 1.0:
            _fail("dropout", self.dropout, "must be in [0, 1)")
        if self.mtp_depth < 0:
            _fail("mtp_depth", self.mtp_depth, "must be >= 0 (0 turns multi-token prediction off)")
        if self.n_dense_layers > self.n_layers:
            _fail("n_dense_layers", self.n_dense_layers, f"must be <= n_layers={self.n_layers}")
        if self.rope_factor < 1.0:
            _fail("rope_factor", self.rope_factor, "must be >= 1 (1 means no scaling)")
        if self.attention == "gqa":
            self._derive_gqa()
        else:
            self._check_mla()
        if self.n_routed_experts > 0:
            self._check_moe()

    def _derive_gqa(self) -> None:
        # Values derived by an earlier validation (a preset, or the CLI's defaults) are derived again,
        # so `from_preset("tiny-gqa", dim=256)` or `--model.dim 256` does not keep a stale head_dim.
        if self.derived.get("auto_head_dim") == self.head_dim:
            self.head_dim = None
        if self.derived.get("auto_n_kv_heads") == self.n_kv_heads:
            self.n_kv_heads = None
        if self.embd_scale != 1.0 and "dim" not in self.derived:
            # Seed 004: widen the residual stream with the memory GQA frees; keep it a multiple of n_heads,
            # and of 2 * n_heads when head_dim = dim // n_heads is derived (RoPE needs it even: 768 * 1.12
            # rounded to a multiple of 12 would give head_dim 71).
            step = self.n_heads * (2 if self.head_dim is None else 1)
            widened = max(int(self.dim * self.embd_scale) // step * step, step)
            self.derived["dim"] = f"{self.dim} * embd_scale {self.embd_scale} -> {widened}"
            self.dim = widened
            self.embd_scale = 1.0
        if self.kv_head_ratio is not None:
            if not 0 < self.kv_head_ratio <= 1:
                _fail("kv_head_ratio", self.kv_head_ratio, "must be in (0, 1]: n_kv_heads = n_heads * ratio")
            n_kv = max(1, int(self.n_heads * self.kv_head_ratio))
            while self.n_heads % n_kv:  # round down to a divisor of n_heads
                n_kv -= 1
            self.derived["n_kv_heads"] = f"n_heads {self.n_heads} * kv_head_ratio {self.kv_head_ratio} -> {n_kv}"
            self.n_kv_heads = n_kv
            self.kv_head_ratio = None
        if self.n_kv_heads is None:
            self.n_kv_heads = self.derived["auto_n_kv_heads"] = self.n_heads
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            _fail("n_kv_heads", self.n_kv_heads, f"must be a positive divisor of n_heads={self.n_heads}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                _fail("dim", self.dim, f"must be divisible by n_heads={self.n_heads}, or set head_dim explicitly")
            self.head_dim = self.derived["auto_head_dim"] = self.dim // self.n_heads
        if self.head_dim <= 0 or self.head_dim % 2:
            _fail("head_dim", self.head_dim, "must be a positive even number (rotary embeddings rotate pairs)")

    def _check_mla(self) -> None:
        gqa_only = "GQA settings do not apply to attention='mla' (every head has its own K/V from the latent)"
        if self.kv_head_ratio is not None:
            _fail("kv_head_ratio", self.kv_head_ratio, gqa_only)
        if self.n_kv_heads not in (None, self.n_heads):
            _fail("n_kv_heads", self.n_kv_heads, gqa_only)
        if self.head_dim is not None:  # silently ignoring it would build a different model than asked for
            _fail("head_dim", self.head_dim, "is for GQA; MLA's head sizes are qk_nope_head_dim, qk_rope_head_dim, v_head_dim")
        if self.embd_scale != 1.0:
            _fail("embd_scale", self.embd_scale, "widens dim for attention='gqa' only; set dim directly for MLA")
        require_positive(self, "kv_lora_rank", "qk_rope_head_dim", "v_head_dim")
        require_non_negative(self, "qk_nope_head_dim")
        if self.qk_rope_head_dim % 2:
            _fail("qk_rope_head_dim", self.qk_rope_head_dim, "must be even (rotary embeddings rotate pairs)")
        if self.qk_norm:
            _fail("qk_norm", True, "is for GQA; MLA has its latent norms and QK-clip (qk_clip_threshold)")

    def _check_moe(self) -> None:
        require_positive(self, "moe_inter_dim", "n_activated_experts", "n_expert_groups", "n_limited_groups")
        if self.n_activated_experts > self.n_routed_experts:
            _fail("n_activated_experts", self.n_activated_experts,
                  f"must be <= n_routed_experts={self.n_routed_experts}")
        if self.n_routed_experts % self.n_expert_groups:
            _fail("n_expert_groups", self.n_expert_groups,
                  f"must divide n_routed_experts={self.n_routed_experts}")
        if self.n_limited_groups > self.n_expert_groups:
            _fail("n_limited_groups", self.n_limited_groups, f"must be <= n_expert_groups={self.n_expert_groups}")
        per_group = self.n_routed_experts // self.n_expert_groups
        if self.n_expert_groups > 1 and per_group < 2:
            _fail("n_expert_groups", self.n_expert_groups, "each group needs >= 2 experts (groups are scored by their top-2)")
        if self.n_limited_groups * per_group < self.n_activated_experts:
            _fail("n_limited_groups", self.n_limited_groups,
                  f"the {self.n_limited_groups} kept groups hold fewer than n_activated_experts={self.n_activated_experts} experts")

    # ---- derived sizes -------------------------------------------------------------------------

    @property
    def uses_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.uses_moe and layer_id >= self.n_dense_layers

    def kv_cache_values_per_token(self) -> int:
        """Cached values per token per layer: full K/V for GQA, latent + rope key for MLA."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.n_kv_heads * self.head_dim

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"preset={name!r}: unknown; choose one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], derived=dict(PRESETS[name].derived), **overrides)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "derived"}

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        return cls(**_known_fields(cls, values, "model"))


def _known_fields(cls: type, values: dict, section: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"[{section}] {unknown[0]}: unknown field; known fields are {', '.join(sorted(names))}")
    return dict(values)


def _tiny(**kw: Any) -> ModelConfig:
    return ModelConfig(**kw)


PRESETS: dict[str, ModelConfig] = {
    # CPU-fast: MLA + MoE (1 shared + 8 routed, top-2) + one MTP module.
    "tiny": _tiny(),
    # MLA with dense SwiGLU everywhere, no MTP.
    "tiny-dense": _tiny(n_routed_experts=0, mtp_depth=0),
    # The GQA baseline (Llama-style, exports to transformers' Llama): 4 query heads share 2 KV heads.
    "tiny-gqa": _tiny(attention="gqa", n_kv_heads=2, n_routed_experts=0, mtp_depth=0),
    "small": ModelConfig(vocab_size=8192, dim=384, n_layers=6, n_heads=6, max_seq_len=512,
                         kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64,
                         inter_dim=1024, n_routed_experts=16, n_activated_experts=2, moe_inter_dim=256),
    "medium": ModelConfig(vocab_size=32768, dim=768, n_layers=12, n_heads=12, max_seq_len=1024,
                          q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                          v_head_dim=64, inter_dim=2048, n_routed_experts=32, n_activated_experts=4,
                          moe_inter_dim=384, route_scale=2.0),
    # ~0.9B total / 0.26B active: the top of the range one 80 GB GPU trains comfortably.
    "large": ModelConfig(vocab_size=32768, dim=1024, n_layers=20, n_heads=16, max_seq_len=2048,
                         q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                         v_head_dim=64, inter_dim=2816, n_routed_experts=32, n_activated_experts=4,
                         moe_inter_dim=384, n_expert_groups=4, n_limited_groups=2, route_scale=2.5),
    # ~1.5B total / 0.44B active.
    "xl": ModelConfig(vocab_size=49152, dim=1280, n_layers=20, n_heads=16, max_seq_len=2048,
                      q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=96, qk_rope_head_dim=32,
                      v_head_dim=96, inter_dim=3456, n_routed_experts=32, n_activated_experts=4,
                      moe_inter_dim=512, n_expert_groups=4, n_limited_groups=2, route_scale=2.5),
    # SmolLM2-135M's shape (576 dim, 30 layers, 9 heads, vocab 49152) as MLA + MoE, seed 001:
    # 1 shared + 7 routed experts, top-2; each expert a third of SmolLM2's 1536-wide MLP.
    "smoldeepseek-135m": ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, max_seq_len=2048,
                                     kv_lora_rank=192, qk_nope_head_dim=48, qk_rope_head_dim=16,
                                     v_head_dim=64, inter_dim=1536, n_dense_layers=1, n_routed_experts=7,
                                     n_shared_experts=1, n_activated_experts=2, moe_inter_dim=512,
                                     tie_embeddings=True, rope_theta=100000.0),
}


@dataclass
class DataConfig:
    """Where tokens come from."""

    source: str = "builtin:pydocs"  # builtin:pydocs | builtin:stdlib | file | dir | glob | hf:NAME | prepared dir
    tokenizer: str = "bpe"  # char | byte | bpe | path/to/tokenizer.json
    vocab_size: int = 2048  # bpe only: size of the vocabulary to train
    seq_len: int = 128
    val_fraction: float = 0.05
    shard_tokens: int = 1 << 24  # tokens per shard file
    hf_split: str = "train"
    hf_text_field: str = "text"

    def __post_init__(self) -> None:
        require_positive(self, "vocab_size", "seq_len", "shard_tokens")
        if not 0.0 < self.val_fraction < 0.5:
            _fail("val_fraction", self.val_fraction, "must be in (0, 0.5)")
        if self.tokenizer == "bpe" and self.vocab_size < 260:
            _fail("vocab_size", self.vocab_size, "a byte-level BPE needs >= 260 (256 bytes + specials)")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    max_steps: int = 300
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: Literal["adamw", "lion", "muon"] = "adamw"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    muon_lr: float = 0.02
    schedule: Literal["cosine", "wsd", "constant", "cyclic"] = "cosine"
    warmup_steps: int = 30
    decay_fraction: float = 0.2  # wsd: share of steps spent in the final linear decay
    cycle_steps: int = 200  # cyclic: period
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still computed for the guard)
    zclip: float = 2.5  # ZClip (arXiv 2504.02507): clip grad norms above this EMA z-score (train/clipping.py); 0 = off
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    fp8: bool = False  # torchao float8 linears (CUDA >= 8.9); MLA projections, router, head stay high
    activation_checkpointing: bool = False
    loss_chunk: int = 0  # tokens per chunk of head + cross-entropy, recomputed in backward (no full logits); 0 = off
    mtp_rampup_steps: int = 50  # ramp the MTP weight linearly from 0 over these steps
    eval_every: int = 100
    eval_batches: int = 8
    early_stop_patience: int = 0  # evals without improvement before stopping; 0 = off
    ema_decay: float = 0.0  # 0 = off; e.g. 0.999 keeps an EMA copy of the weights for eval
    grad_noise: float = 0.0  # eta of Neelakantan et al. 2015: sigma^2 = eta / (1 + step)^0.55; 0 = off
    save_every: int = 100
    keep_last: int = 2
    keep_best: int = 1
    log_every: int = 10
    sample_tokens: int = 200
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "nanoseek"
    # Data parallelism under torchrun (README "Multiple GPUs"): none | ddp | fsdp (FSDP2 fully_shard).
    # batch_size stays per process: the global batch is batch_size * grad_accum * world_size.
    dist: Literal["none", "ddp", "fsdp"] = "none"

    def __post_init__(self) -> None:
        require_positive(self, "max_steps", "batch_size", "grad_accum", "lr", "eval_every", "eval_batches",
                  "save_every", "log_every", "cycle_steps", "muon_lr")
        require_non_negative(self, "weight_decay", "warmup_steps", "grad_clip", "mtp_rampup_steps",
                      "early_stop_patience", "grad_noise", "keep_best", "sample_tokens", "loss_chunk", "zclip")
        _one_of(self, "optimizer", ("adamw", "lion", "muon"))
        _one_of(self, "schedule", ("cosine", "wsd", "constant", "cyclic"))
        _one_of(self, "precision", ("fp32", "bf16", "fp16"))
        _one_of(self, "dist", ("none", "ddp", "fsdp"))
        if self.dist == "fsdp":
            self._check_fsdp()
        if self.fp8 and self.precision != "bf16":
            _fail("fp8", True, "needs precision='bf16' (fp8 matmuls run inside a bf16 autocast)")
        if self.keep_last < 1:
            _fail("keep_last", self.keep_last, "must be >= 1 (the newest checkpoint is what --resume uses)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            _fail("min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            _fail("ema_decay", self.ema_decay, "must be in [0, 1); 0 turns EMA off")
        if not 0.0 < self.decay_fraction <= 1.0:
            _fail("decay_fraction", self.decay_fraction, "must be in (0, 1]")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _fail(name, getattr(self, name), "must be in [0, 1)")

    def _check_fsdp(self) -> None:
        # What sharded training here does not do (each needs whole tensors, or is untested on shards), and the fix.
        why = {"optimizer": (self.optimizer == "muon", "Muon orthogonalises whole matrices and FSDP holds "
                             "row shards; use --train.dist ddp with Muon, or adamw/lion with fsdp"),
               "ema_decay": (self.ema_decay > 0, "the EMA copy is not sharded; use --train.dist ddp for EMA "
                             "weights, or --train.ema-decay 0"),
               "precision": (self.precision == "fp16", "the fp16 GradScaler is not wired to sharded gradients; "
                             "use --train.precision bf16 (or fp32) with fsdp"),
               "fp8": (self.fp8, "float8 linears on sharded weights are untested in nanoseek; use --train.dist "
                       "ddp with fp8"),
               "grad_noise": (self.grad_noise > 0, "gradient noise is drawn per whole gradient, not per shard; use "
                              "--train.dist ddp, or --train.grad-noise 0")}
        for name, (refused, fix) in why.items():
            if refused:
                _fail(name, getattr(self, name), f"does not work with dist='fsdp': {fix}")


@dataclass
class GuardConfig:
    """The stability guard: what counts as a fault and what is done about it."""

    enabled: bool = True
    window: int = 50  # steps of history for spike statistics (OLMo-core uses 128)
    warmup: int = 20  # steps before spike detection starts (the window must fill first)
    spike_sigma: float = 6.0  # a loss or grad norm this many std above the window mean is a spike
    max_skips: int = 3  # skips within `window` steps before a rollback
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    rollback_skip_batches: int = 0  # batches to skip after a rollback; 0 = the window that led in
    snapshot_every: int = 20  # steps between in-memory good-state snapshots
    stats_every: int = 10  # steps between health-statistic samples
    plateau_margin: float = 0.1  # nats: a loss this close to the unigram entropy after warm-up is a plateau; 0 = off
    plateau_patience: int = 50  # applied steps without 0.1 nats of progress that make a plateau (train/plateau.py)
    plateau_lr_factor: float = 0.1  # LR factor after a plateau or a diverged loss: such an LR is off by a decade
    save_bad_batches: bool = True
    inject: tuple[str, ...] = ()  # fault injection: KIND@STEP, e.g. nan-loss@12, inf-act:layers.1.ffn@5

    def __post_init__(self) -> None:
        require_positive(self, "window", "spike_sigma", "max_skips", "rollback_lr_factor", "snapshot_every", "stats_every",
                         "plateau_patience", "plateau_lr_factor")
        require_non_negative(self, "warmup", "max_rollbacks", "rollback_skip_batches", "plateau_margin")
        if self.warmup > self.window:
            _fail("warmup", self.warmup, f"must be <= window={self.window}: the window could never fill, "
                  "so spike detection would be off")
        from nanoseek.train.faults import parse_fault  # a bad --inject fails before any data is prepared

        for spec in self.inject:
            parse_fault(spec)
        for name in ("rollback_lr_factor", "plateau_lr_factor"):
            if getattr(self, name) > 1:
                _fail(name, getattr(self, name), "must be in (0, 1]: the LR is multiplied by it")


@dataclass
class RunConfig:
    """Everything a run needs; saved as config.toml in the run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    preset: str = "tiny"
    out: str = ""  # run directory; empty: runs/<preset>-<timestamp>
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        _one_of(self, "device", ("auto", "cpu", "cuda"))
        if self.data.seq_len > self.model.max_seq_len:
            _fail("data.seq_len", self.data.seq_len, f"must be <= model.max_seq_len={self.model.max_seq_len}")
        if self.train.dist == "fsdp" and self.model.qk_clip_threshold > 0:
            _fail("model.qk_clip_threshold", self.model.qk_clip_threshold, "QK-clip rescales per-head rows that "
                  "FSDP shards across ranks; use --train.dist ddp with QK-clip")

    def to_dict(self) -> dict:
        return {
            "preset": self.preset, "out": self.out, "seed": self.seed, "device": self.device,
            "model": self.model.to_dict(),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
            "guard": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self.guard).items()},
        }

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        values = dict(values)
        preset = values.get("preset", "tiny")
        # A run's own label (e.g. "converted") names no preset; its [model] section is complete anyway.
        base_model = (ModelConfig.from_preset(preset) if preset in PRESETS else ModelConfig()).to_dict()
        base_model.update(values.pop("model", {}))
        guard = dict(values.pop("guard", {}))
        if "inject" in guard:
            guard["inject"] = tuple(guard["inject"])
        top = _known_fields(cls, values, "run")
        return cls(
            model=ModelConfig.from_dict(base_model),
            data=DataConfig(**_known_fields(DataConfig, top.pop("data", {}), "data")),
            train=TrainConfig(**_known_fields(TrainConfig, top.pop("train", {}), "train")),
            guard=GuardConfig(**_known_fields(GuardConfig, guard, "guard")),
            **top,
        )

    def save_toml(self, path: str | Path) -> None:
        Path(path).write_text(to_toml(self.to_dict()))

    @classmethod
    def load_toml(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist; pass a TOML file written by a run or by hand")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {err}") from None
        return cls.from_dict(values)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "inf" if value > 0 else "nan"
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(values: dict) -> str:
    """A minimal TOML writer for flat tables of scalars and lists (None values are omitted)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in values.items() if not isinstance(v, dict) and v is not None]
    for section, table in values.items():
        if isinstance(table, dict):
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"
