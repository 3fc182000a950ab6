"""The NPT block: a frozen decoder block whose attention residual is replaced by an adapter that
modulates the MLP's gate.

What a base Block computes (pre-norm):

    h   = x + attn(attn_norm(x))
    out = h + w2(silu(w1 n) * w3 n),                      n = ffn_norm(h)

What an NPTBlock computes from the same frozen modules:

    a     = attn(attn_norm(x))                            [B, T, dim]   attention output, no residual
    m     = ffn_norm(x)                                   [B, T, dim]   the block's input, normed
    z     = down(a / rms(x))                              [B, T, rank]  rms over dim, per token
    shift = gate_shift(z)                                 [B, T, inter] additive path
    scale = 0.5 + sigmoid(gate_scale(z))                  [B, T, inter] multiplicative path, in [0.5, 1.5]
    g     = w1(m) * scale + SHIFT_SCALE * shift           (safe mode: w1(m) + SHIFT_SCALE * shift)
    out   = x + w2(silu(g) * w3(m))

So attention no longer writes into the residual stream: what it found reaches the block only through
the gate of the MLP, per token. The adapter (down, gate_shift, gate_scale) is the only trainable part.

Why these choices (lessons of earlier NPT training that fought NaNs):
- The multiplicative factor must never reach 0 (a `1 + tanh` factor did, zeroing activations and
  sending gradients to 0 or inf) nor grow without bound: `0.5 + sigmoid(.)` lies in [0.5, 1.5] for
  every input, +-inf included (it saturates at the ends exactly, never overflows), and is exactly 1 at
  its zero initialisation. (`0.5 * sigmoid(.) + 0.5` would span only (0.5, 1.0) and be 0.75 at zero,
  shrinking every gate by a quarter at init.)
- The additive path is scaled by SHIFT_SCALE = 0.1 and gate_shift starts at N(0, 0.001): at init it
  moves each gate pre-activation by 0.1 * |gate_shift(down(a))|, orders of magnitude below w1(m).
- The adapter reads the attention output relative to the residual stream (a / rms(x)), and `down` starts
  at N(0, 1/dim) (fan-in), so z has the same O(1) scale in a 64-wide test model and a 4096-wide one (where
  1/sqrt(dim) is 0.016). With a raw `a` and a fixed std of 0.02, a small model's z was ~1e-3 and
  the zero-initialised gate_scale needed thousands of steps to move.

Bound at initialisation (checked in tests/test_npt.py): with gate_scale at zero the factor is exactly 1,
so the block differs from `x + w2(silu(w1 m) * w3 m)` (the block with its attention residual dropped)
only through 0.1 * shift; for the tiny test model that is under 1e-3 of the output's norm (about 1e-4,
7e-5 to 1.3e-4 with the random init; the test prints it). The student as a whole therefore starts as the base model minus the converted layers'
attention residuals; teacher-student training (train/objectives.py) teaches the adapters to put that back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.layers import MLP, clamp_counted

SHIFT_SCALE = 0.1  # the additive path enters at a tenth of its size
SHIFT_INIT_STD = 0.001
FACTOR_MIN, FACTOR_MAX = 0.5, 1.5


def relative_to(attn_out: torch.Tensor, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """attn_out [B, T, dim] in units of the rms of x [B, T, dim] (per token), same dtype.

    What the attention would have added, measured against the residual stream it would have been added
    to: the adapter then sees inputs of the same scale in any model (a small freshly trained model's
    stream has rms ~0.1, a large trained one's is orders of magnitude larger), as the normalised loss does.
    """
    scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (attn_out.float() * scale).to(attn_out.dtype)


def gate_factor(logits: torch.Tensor) -> torch.Tensor:
    """The multiplicative modulation: logits [..., inter] -> 0.5 + sigmoid(logits), in [0.5, 1.5].

    Computed in fp32 (sigmoid saturates cleanly there, and bf16 rounding near 1.5 stays in range);
    returned in the logits' dtype. +inf gives 1.5, -inf gives 0.5; only a NaN logit gives NaN.
    """
    return (FACTOR_MIN + (FACTOR_MAX - FACTOR_MIN) * torch.sigmoid(logits.float())).to(logits.dtype)


class NPTAdapter(nn.Module):
    """Low-rank map from the attention output to the two gate modulations.

    down:       dim -> rank      (A_proj), N(0, 1/dim)
    gate_shift: rank -> inter    (B_add), N(0, 0.001)
    gate_scale: rank -> inter    (B_mult), zeros; absent in safe mode
    """

    def __init__(self, dim: int, inter_dim: int, rank: int, safe_mode: bool = False):
        super().__init__()
        self.rank = rank
        self.down = nn.Linear(dim, rank, bias=False)
        self.gate_shift = nn.Linear(rank, inter_dim, bias=False)
        self.gate_scale = None if safe_mode else nn.Linear(rank, inter_dim, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.down.weight, std=self.down.in_features ** -0.5)
        nn.init.normal_(self.gate_shift.weight, std=SHIFT_INIT_STD)
        if self.gate_scale is not None:
            nn.init.zeros_(self.gate_scale.weight)

    def forward(self, attn_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """attn_out [B, T, dim] -> (shift [B, T, inter], scale logits [B, T, inter] or None in safe mode).

        The raw outputs, before SHIFT_SCALE and gate_factor: the regulariser penalises these.
        """
        z = self.down(attn_out)  # [B, T, rank]
        return self.gate_shift(z), (self.gate_scale(z) if self.gate_scale is not None else None)


class NPTBlock(nn.Module):
    """A Block whose attention residual is replaced by gate modulation (see the module docstring).

    Holds the original block's submodules under their own names (attn_norm, attn, ffn_norm, ffn), so
    the frozen weights keep their state-dict names and are shared with, not copied from, the base.
    """

    def __init__(self, block: nn.Module, rank: int, safe_mode: bool = False):
        super().__init__()
        if not isinstance(block.ffn, MLP):
            raise ValueError(f"layer {block.layer_id} has a {type(block.ffn).__name__} feed-forward; NPT modulates "
                             "a dense SwiGLU MLP's gate, so choose dense layers (--layers)")
        self.layer_id = block.layer_id
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = block.attn_norm, block.attn, block.ffn_norm, block.ffn
        w1 = block.ffn.w1
        # Trainable weights in the base's float dtype; fp32 over a quantised base (FrozenQuantizedLinear has no
        # .weight, and its compute is fp32). The block's norm is never quantised: its device is the base's.
        weight = getattr(w1, "weight", None)
        dtype = weight.dtype if weight is not None and weight.dtype.is_floating_point else torch.float32
        device = block.ffn_norm.weight.device
        self.adapter = NPTAdapter(w1.in_features, w1.out_features, rank, safe_mode).to(device, dtype)

    def forward(self, x: torch.Tensor, start_pos: int = 0, key_mask: torch.Tensor | None = None,
                cache=None, router_losses: list | None = None) -> torch.Tensor:
        """x: [B, T, dim] -> [B, T, dim] (the residual stream); same signature as Block (dense: no router losses)."""
        attn_out = self.attn(self.attn_norm(x), start_pos, key_mask, cache)
        shift, scale_logits = self.adapter(relative_to(attn_out, x))
        m = self.ffn_norm(x)  # the block's input, not x + attn_out: attention reaches the MLP only via the gate
        ffn = self.ffn
        gate, up = ffn.gate_up(m)
        if scale_logits is not None:
            gate = gate * gate_factor(scale_logits)
        gate = gate + SHIFT_SCALE * shift
        if ffn.clamp > 0:  # the base's opt-in clamp applies to the modulated gate as it would to the plain one
            gate, up = clamp_counted(ffn.clamped, ffn.clamp, gate, up)
        return x + ffn.w2(F.silu(gate) * up)
