"""Building blocks: RMSNorm, SwiGLU MLP, rotary position embeddings."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 if it is bf16/fp16 (a float64 reference model stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019), statistics in fp32 (fp64 for a float64 model) whatever the input dtype.
    The weight multiplies after the cast back, as transformers' Llama/DeepseekV3 do: exports give the same numbers."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if needs_grad and not torch.compiler.is_compiling():
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        # Inference, and under torch.compile, where inductor fuses these few ops into one kernel.
        xc = at_least_fp32(x)
        normed = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward: eager autograd records ~8 elementwise ops per norm and replays each
    in backward, where the closed form needs 5 full-size passes (bench/RESULTS.md, "CPU kernel choices").

    With xhat = x * r, r = 1 / sqrt(mean(x^2) + eps) and y = w * xhat (D features):
        dL/dx = r * (g w - xhat * mean(g w xhat)),   dL/dw = sum over tokens of g * xhat."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xc = at_least_fp32(x)
        # vector_norm reads x once and writes [..., 1]: no x^2 temporary.
        sq = torch.linalg.vector_norm(xc, dim=-1, keepdim=True).square_()
        rstd = sq.div_(x.shape[-1]).add_(eps).rsqrt_()  # [..., 1]
        xhat = xc * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.x_dtype = x.dtype
        return weight * xhat.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xhat, rstd, weight = ctx.saved_tensors
        g = grad.to(xhat.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gw = g * weight.to(xhat.dtype)
            mean_gw_xhat = torch.linalg.vecdot(gw, xhat).unsqueeze(-1).div_(-xhat.shape[-1])  # [..., 1]
            grad_x = torch.addcmul(gw, xhat, mean_gw_xhat).mul_(rstd).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g * xhat).flatten(0, -2).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): w2(silu(w1 x) * w3 x). Names follow DeepSeek-V3's code."""

    FUSIBLE = (("w13", ("w1", "w3")),)  # stacked into one linear for generation (model/packed.py)

    def __init__(self, dim: int, inter_dim: int, clamp: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up
        self.w13: nn.Module | None = None  # [w1; w3] in one layer, set by fuse_linears for decoding
        # Opt-in clamp of the SwiGLU pre-activations, never silent: `clamped` counts (health_stats logs it).
        self.clamp = clamp
        self.register_buffer("clamped", torch.zeros((), dtype=torch.long), persistent=False)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [..., dim] -> (w1 x, w3 x), each [..., inter_dim]: one stacked call once fused for decoding."""
        if self.w13 is not None:
            return self.w13(x).chunk(2, dim=-1)
        return self.w1(x), self.w3(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(*self.gate_up(x), self.clamp, self.clamped))


def swiglu(gate: torch.Tensor, up: torch.Tensor, clamp: float, clamped: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; with clamp > 0 both are first clamped to [-clamp, clamp], the number of values clamped
    added to the counter `clamped` (no host sync)."""
    if clamp > 0:
        with torch.no_grad():
            clamped += sum((t.detach().abs() > clamp).sum() for t in (gate, up))
        gate, up = gate.clamp(-clamp, clamp), up.clamp(-clamp, clamp)
    return F.silu(gate) * up


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature (Peng et al. 2023, eq. 8), in DeepSeek-V3's parameterisation."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(cfg: ModelConfig) -> float:
    """YaRN's factor on cos/sin (1 without YaRN), less the part mscale_all_dim moves into `softmax_scale`."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    factor = _yarn_mscale(cfg.rope_factor, cfg.mscale)
    return factor / _yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim) if cfg.mscale_all_dim else factor


def _yarn_inv_freq(inv_freq: torch.Tensor, cfg: ModelConfig, dim: int) -> torch.Tensor:
    """Blend interpolated (low-frequency) and extrapolated (high-frequency) dims, YaRN section 3.2."""
    original_len = cfg.rope_original_max_seq_len or cfg.max_seq_len

    def correction_dim(n_rotations: float) -> float:
        return dim * math.log(original_len / (n_rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    return inv_freq / cfg.rope_factor * (1 - extrapolate) + inv_freq * extrapolate


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021) in DeepSeek's interleaved layout: pairs (x[2i], x[2i+1]) rotate
    by frequency i, as DeepSeek-V3's reference code and transformers' `rope_interleave=True`. Frequencies and
    angles are float64 so long contexts and large theta keep their precision; the rotation runs in fp32 (fp64
    for a float64 model)."""

    def __init__(self, dim: int, cfg: ModelConfig):
        super().__init__()
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        if cfg.rope_scaling == "linear":
            inv_freq = inv_freq / cfg.rope_factor
        elif cfg.rope_scaling == "yarn":
            inv_freq = _yarn_inv_freq(inv_freq, cfg, dim)
        self.inv_freq, self.max_seq_len = inv_freq, cfg.max_seq_len
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv_freq)  # [S, dim/2]
        # e^{i angle} times the YaRN factor: a pair read as the complex number x[2i] + i x[2i+1] rotates by one
        # complex multiply, in eager mode on CPU cheaper (forward and backward) than four real products and a
        # stack. Plain attributes, not buffers, so model.to(bfloat16) cannot round them (_apply moves them);
        # every dtype the forward asks for is made here, as one first cast under torch.compile would recompile.
        exact = torch.polar(torch.full_like(angles, yarn_attention_factor(cfg)), angles)
        real = torch.stack([exact.real, exact.imag])
        self.tables = {torch.complex128: exact, torch.complex64: exact.to(torch.complex64),
                       torch.float64: real, torch.float32: real.float()}

    def _apply(self, fn, recurse: bool = True):
        """model.to(device) / .cuda() move the tables too, never changing their dtype (see __init__)."""
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, dtype=torch.float64)).device
        self.tables = {dtype: t.to(device) for dtype, t in self.tables.items()}
        return self

    def table(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The rotation table [max_seq_len, dim/2] in `dtype` (complex64/128; float32/64: cos and sin stacked
        as [2, max_seq_len, dim/2]) on `device`, from the float64 angles."""
        if self.tables[dtype].device != device:  # the module was not moved with .to(): move the tables now
            self.tables = {kind: t.to(device) for kind, t in self.tables.items()}
        return self.tables[dtype]

    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """Rotate x: [B, T, H, dim] (positions start_pos..start_pos+T-1, or start_pos itself when it is a
        [B, T] tensor of per-row positions, as static caches give) -> same shape and dtype."""
        seq_len = x.shape[1]
        if torch.is_tensor(start_pos):
            positions = start_pos
        elif start_pos + seq_len > self.max_seq_len:
            raise ValueError(f"position {start_pos + seq_len - 1} is past max_seq_len={self.max_seq_len}; "
                             "raise model.max_seq_len or feed shorter sequences")
        else:
            positions = slice(start_pos, start_pos + seq_len)
        real = torch.promote_types(x.dtype, torch.float32)
        if torch.compiler.is_compiling():
            # Inductor generates no code for complex operators; it fuses this real form into one kernel.
            cos, sin = self.table(real, x.device)[:, positions].unsqueeze(-2)  # [(B,) T, 1, dim/2] each
            even, odd = x[..., 0::2].to(real), x[..., 1::2].to(real)
            return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).to(x.dtype)
        rotation = self.table(torch.complex128 if real == torch.float64 else torch.complex64, x.device)
        x_real = x.to(real).contiguous()
        if x_real.storage_offset() % 2:  # a slice after an odd-width one (e.g. an odd kv_lora_rank): realign
            x_real = x_real.clone()
        pairs = torch.view_as_complex(x_real.unflatten(-1, (-1, 2)))  # [B, T, H, dim/2]
        return torch.view_as_real(pairs * rotation[positions].unsqueeze(-2)).flatten(-2).to(x.dtype)


def softmax_scale(cfg: ModelConfig, head_dim: int) -> float:
    """1/sqrt(d), times YaRN's mscale^2 when mscale_all_dim is set (DeepSeek-V3's attention temperature)."""
    scale = head_dim ** -0.5
    if cfg.rope_scaling == "yarn" and cfg.mscale_all_dim:
        scale *= _yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim) ** 2
    return scale
