"""ModelConfig, a Transformer's shape and numerics validated before any tensor is made, and the presets. Field
names follow DeepSeek-V3's reference code where the concept exists there. config.py re-exports all this."""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints


def _fail(field_name: str, value: Any, fix: str) -> None:
    raise ValueError(f"{field_name}={value!r}: {fix}")


def _is_number(value: Any) -> bool:
    # NaN compares false with everything, so `value <= 0` alone would let it (and inf) through.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_positive(obj: Any, *names: str) -> None:
    for name in names:
        if not _is_number(value := getattr(obj, name)) or value <= 0:
            _fail(name, value, "must be a finite positive number")


def require_non_negative(obj: Any, *names: str) -> None:
    for name in names:
        if not _is_number(value := getattr(obj, name)) or value < 0:
            _fail(name, value, "must be a finite number >= 0")


def _check_choices(obj: Any) -> None:
    for name, kind in get_type_hints(type(obj)).items():  # hints, not field types: they see through Annotated
        if get_origin(kind) is Literal and (value := getattr(obj, name)) not in get_args(kind):
            _fail(name, value, f"must be one of {', '.join(map(repr, get_args(kind)))}")


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
    kv_latent_norm: bool = True
    """MLA: RMS-normalise the KV latent (DeepSeek-V2's kv_a_layernorm); off suits a model converted from GQA."""
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
    """MLA QK-clip (Kimi K2, arXiv 2507.20534): rescale Q/K weights of heads whose max logit passes this (0: off)."""
    logit_z_loss_coef: float = 0.0
    """Output-logit z-loss weight (PaLM, arXiv 2204.02311 section 5 uses 1e-4; 0: off)."""
    router_fp32: bool = True
    """Router scores in fp32 even under autocast (DeepSeek-V3, ST-MoE)."""
    swiglu_clamp: float = 0.0
    """Clamp SwiGLU pre-activations to +-this (opt-in; the clamped count is logged; 0: off)."""
    npt_layers: tuple[int, ...] = ()
    """NPT: dense layers whose block is an NPTBlock (attention modulates the MLP gate; `nanoseek npt` sets it)."""
    npt_rank: int = 16
    """NPT: rank of the adapters' projection of the attention output."""
    npt_safe_mode: bool = False
    """NPT: additive gate modulation only."""
    # What __post_init__ derived (kv_head_ratio, embd_scale, an automatic head_dim or n_kv_heads): for the record,
    # and so that a copy with a new dim derives them again. Not a setting (the CLI hides it).
    derived: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        require_positive(self, "vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "rope_theta", "norm_eps",
                         "embd_scale", "inter_dim", "init_std", "beta_fast", "beta_slow", "mscale", "npt_rank")
        _check_choices(self)
        require_non_negative(self, "q_lora_rank", "n_dense_layers", "n_routed_experts", "n_shared_experts",
                             "route_scale", "balance_rate", "aux_loss_coef", "router_z_loss_coef", "mtp_weight",
                             "qk_clip_threshold", "logit_z_loss_coef", "swiglu_clamp", "rope_original_max_seq_len",
                             "mscale_all_dim", "mtp_depth")
        if not 0.0 <= self.dropout < 1.0:
            _fail("dropout", self.dropout, "must be in [0, 1)")
        if self.n_dense_layers > self.n_layers:
            _fail("n_dense_layers", self.n_dense_layers, f"must be <= n_layers={self.n_layers}")
        if not (_is_number(self.rope_factor) and self.rope_factor >= 1.0):
            _fail("rope_factor", self.rope_factor, "must be >= 1 (1 means no scaling)")
        if self.attention == "gqa":
            self._derive_gqa()
        else:
            self._check_mla()
        if self.uses_moe:
            self._check_moe()
        self._check_npt()

    def _derive_gqa(self) -> None:
        # Values derived by an earlier validation (a preset, or the CLI's defaults) are derived again,
        # so `from_preset("tiny-gqa", dim=256)` or `--model.dim 256` does not keep a stale head_dim.
        for name in ("head_dim", "n_kv_heads"):
            if self.derived.get(f"auto_{name}") == getattr(self, name):
                setattr(self, name, None)
        if self.embd_scale != 1.0 and "dim" not in self.derived:
            # Widen the residual stream with the KV-cache memory GQA frees; keep it a multiple of n_heads,
            # and of 2 * n_heads when head_dim = dim // n_heads is derived (RoPE needs it even: 768 * 1.12
            # rounded to a multiple of 12 would give head_dim 71).
            step = self.n_heads * (2 if self.head_dim is None else 1)
            widened = max(int(self.dim * self.embd_scale) // step * step, step)
            self.derived["dim"] = f"{self.dim} * embd_scale {self.embd_scale} -> {widened}"
            self.dim, self.embd_scale = widened, 1.0
        if self.kv_head_ratio is not None:
            if not 0 < self.kv_head_ratio <= 1:
                _fail("kv_head_ratio", self.kv_head_ratio, "must be in (0, 1]: n_kv_heads = n_heads * ratio")
            limit = max(1, int(self.n_heads * self.kv_head_ratio))
            n_kv = max(d for d in range(1, limit + 1) if self.n_heads % d == 0)  # largest divisor of n_heads <= limit
            self.derived["n_kv_heads"] = f"n_heads {self.n_heads} * kv_head_ratio {self.kv_head_ratio} -> {n_kv}"
            self.n_kv_heads, self.kv_head_ratio = n_kv, None
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
        # A GQA setting silently ignored would build a different model than asked for.
        gqa_only = {"kv_head_ratio": self.kv_head_ratio is not None, "head_dim": self.head_dim is not None,
                    "n_kv_heads": self.n_kv_heads not in (None, self.n_heads), "embd_scale": self.embd_scale != 1.0,
                    "qk_norm": self.qk_norm}
        for name, is_set in gqa_only.items():
            if is_set:
                _fail(name, getattr(self, name), "is for attention='gqa' only: drop it (MLA takes dim as given, sizes "
                      "heads by qk_nope_head_dim, qk_rope_head_dim, v_head_dim, bounds logits by qk_clip_threshold)")
        require_positive(self, "kv_lora_rank", "qk_rope_head_dim", "v_head_dim")
        require_non_negative(self, "qk_nope_head_dim")
        if self.qk_rope_head_dim % 2:
            _fail("qk_rope_head_dim", self.qk_rope_head_dim, "must be even (rotary embeddings rotate pairs)")

    def _check_moe(self) -> None:
        require_positive(self, "moe_inter_dim", "n_activated_experts", "n_expert_groups", "n_limited_groups")
        if self.n_activated_experts > self.n_routed_experts:
            _fail("n_activated_experts", self.n_activated_experts,
                  f"must be <= n_routed_experts={self.n_routed_experts}")
        if self.n_routed_experts % self.n_expert_groups:
            _fail("n_expert_groups", self.n_expert_groups, f"must divide n_routed_experts={self.n_routed_experts}")
        if self.n_limited_groups > self.n_expert_groups:
            _fail("n_limited_groups", self.n_limited_groups, f"must be <= n_expert_groups={self.n_expert_groups}")
        per_group = self.n_routed_experts // self.n_expert_groups
        if self.n_expert_groups > 1 and per_group < 2:
            _fail("n_expert_groups", self.n_expert_groups,
                  "each group needs >= 2 experts (groups are scored by their top-2)")
        if self.n_limited_groups * per_group < self.n_activated_experts:
            _fail("n_limited_groups", self.n_limited_groups, f"the {self.n_limited_groups} kept groups hold fewer "
                  f"than n_activated_experts={self.n_activated_experts} experts")

    def _check_npt(self) -> None:
        self.npt_layers = tuple(self.npt_layers)  # a TOML list reads back as a list
        if list(self.npt_layers) != sorted(set(self.npt_layers)):
            _fail("npt_layers", self.npt_layers, "must be distinct layer ids in ascending order")
        for i in self.npt_layers:
            if not 0 <= i < self.n_layers or self.is_moe_layer(i):
                _fail("npt_layers", self.npt_layers, f"layer {i} is not a dense-MLP layer of this model "
                      f"(layers 0-{self.n_layers - 1}, MoE from {self.n_dense_layers} when n_routed_experts > 0)")

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
    if unknown := sorted(set(values) - names):
        raise ValueError(f"[{section}] {unknown[0]}: unknown field; known fields are {', '.join(sorted(names))}")
    return dict(values)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),  # CPU-fast: MLA + MoE (1 shared + 8 routed, top-2) + one MTP module
    "tiny-dense": ModelConfig(n_routed_experts=0, mtp_depth=0),  # MLA with dense SwiGLU everywhere, no MTP
    # The GQA baseline (Llama-style, exports to transformers' Llama): 4 query heads share 2 KV heads.
    "tiny-gqa": ModelConfig(attention="gqa", n_kv_heads=2, n_routed_experts=0, mtp_depth=0),
    "small": ModelConfig(vocab_size=8192, dim=384, n_layers=6, n_heads=6, max_seq_len=512,
                         kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64,
                         inter_dim=1024, n_routed_experts=16, n_activated_experts=2, moe_inter_dim=256),
    "medium": ModelConfig(vocab_size=32768, dim=768, n_layers=12, n_heads=12, max_seq_len=1024, q_lora_rank=384,
                          kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, inter_dim=2048,
                          n_routed_experts=32, n_activated_experts=4, moe_inter_dim=384, route_scale=2.0),
    # ~0.9B total / 0.26B active: the top of the range one 80 GB GPU trains comfortably.
    "large": ModelConfig(vocab_size=32768, dim=1024, n_layers=20, n_heads=16, max_seq_len=2048, q_lora_rank=512,
                         kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, inter_dim=2816,
                         n_routed_experts=32, n_activated_experts=4, moe_inter_dim=384, n_expert_groups=4,
                         n_limited_groups=2, route_scale=2.5),
    # ~1.5B total / 0.44B active.
    "xl": ModelConfig(vocab_size=49152, dim=1280, n_layers=20, n_heads=16, max_seq_len=2048,
                      q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=96, qk_rope_head_dim=32,
                      v_head_dim=96, inter_dim=3456, n_routed_experts=32, n_activated_experts=4,
                      moe_inter_dim=512, n_expert_groups=4, n_limited_groups=2, route_scale=2.5),
    # SmolLM2-135M's shape (576 dim, 30 layers, 9 heads, vocab 49152) as MLA + MoE (DeepSeekMoE's layout):
    # 1 shared + 7 routed experts, top-2; each expert a third of SmolLM2's 1536-wide MLP.
    "smoldeepseek-135m": ModelConfig(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, max_seq_len=2048, kv_lora_rank=192, qk_nope_head_dim=48,
        qk_rope_head_dim=16, v_head_dim=64, inter_dim=1536, n_dense_layers=1, n_routed_experts=7, n_shared_experts=1,
        n_activated_experts=2, moe_inter_dim=512, tie_embeddings=True, rope_theta=100000.0),
}
