"""Adaptive gradient clipping: clip a gradient-norm spike against the run's own recent norms.

ZClip (Kumar et al. 2025, arXiv 2504.02507): keep an exponential moving mean and variance of the total
gradient norm; a norm whose z-score exceeds `z_threshold` is clipped down to mean + z_threshold * std, and the
clipped value (not the spike) then enters the averages, so one spike cannot drag the threshold up behind it.
The fixed clip (`grad_clip`) still applies on top when it is set (`clip_norm`).

Two differences from the published code, both regression-tested (tests/test_clipping.py):
- A non-finite norm never enters the averages. ZClip's z-test is False for a NaN norm, so nothing is clipped
  and the NaN is folded into mean and variance, which stay NaN for the rest of the run. Here `limit()` reads
  the statistics without changing them, and `commit()` refuses anything but a finite norm.
- The averages move only when a step is applied (`commit()` after the guard's verdict), so a skipped step
  leaves the clipper exactly as if its batch had never been drawn.
"""

from __future__ import annotations

import math

import torch


class AdaptiveClip:
    """Per-run EMA of the total gradient norm; `limit(norm)` is the norm to clip this step's gradient to."""

    def __init__(self, z_threshold: float = 2.5, alpha: float = 0.97, warmup: int = 25):
        if not z_threshold > 0 or not 0 < alpha < 1 or warmup < 1:
            raise ValueError(f"AdaptiveClip(z_threshold={z_threshold}, alpha={alpha}, warmup={warmup}): "
                             "needs z_threshold > 0, 0 < alpha < 1 and warmup >= 1")
        self.z_threshold, self.alpha, self.warmup = z_threshold, alpha, warmup
        self.mean = self.var = 0.0
        self.seen = 0  # norms committed so far; the first `warmup` only build the averages
        self.n_clipped = 0

    def limit(self, norm: float) -> float:
        """The largest norm this step may keep (math.inf: no clipping). Changes nothing."""
        if self.seen < self.warmup or not math.isfinite(norm):
            return math.inf
        std = math.sqrt(self.var)
        if std > 0 and (norm - self.mean) / std > self.z_threshold:
            return self.mean + self.z_threshold * std
        return math.inf

    def commit(self, norm: float) -> None:
        """Record the (unclipped) norm of an applied step; non-finite norms are refused, never averaged."""
        if not math.isfinite(norm):
            return
        kept = min(norm, self.limit(norm))
        if kept < norm:
            self.n_clipped += 1
        self.seen += 1
        if self.seen <= self.warmup:  # plain running mean and variance over the warm-up norms
            delta = kept - self.mean
            self.mean += delta / self.seen
            self.var += (delta * (kept - self.mean) - self.var) / self.seen
            return
        delta = kept - self.mean
        self.mean += (1 - self.alpha) * delta
        self.var = self.alpha * (self.var + (1 - self.alpha) * delta * delta)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "seen": self.seen, "n_clipped": self.n_clipped}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var = float(state["mean"]), float(state["var"])
        self.seen, self.n_clipped = int(state["seen"]), int(state["n_clipped"])


def clip_norm(grad_clip: float, clipper: AdaptiveClip | None, norm: float) -> float:
    """The norm a step's gradient is clipped to: the fixed clip, tightened by the adaptive one (inf: none)."""
    fixed = grad_clip if grad_clip > 0 else math.inf
    return fixed if clipper is None else min(fixed, clipper.limit(norm))


def clip_applied_step(grads: list[torch.Tensor], device_norm: torch.Tensor, norm: float, grad_clip: float,
                      clipper: AdaptiveClip | None) -> None:
    """Clip an applied step's gradients (this rank's parts, in place) to `clip_norm`, and record its norm in the
    clipper: only applied steps move the averages, so a skipped step leaves them untouched. `device_norm` is
    the global norm still on the device (no host sync), `norm` the same value as a host float."""
    limit = clip_norm(grad_clip, clipper, norm)
    if clipper is not None:
        clipper.commit(norm)
    if math.isfinite(limit) and grads:  # clip_grads_with_norm_'s arithmetic, on the local parts
        coef = torch.clamp(limit / (device_norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device))
