"""Adaptive gradient clipping, ZClip (Kumar et al. 2025, arXiv 2504.02507): an EMA of the total gradient norm's
mean and variance; a norm whose z-score exceeds `z_threshold` is clipped to mean + z_threshold * std, and the
clipped value enters the averages, so one spike cannot drag the threshold up. The fixed `grad_clip` applies on top.

Unlike the published code, a non-finite norm never enters the averages (ZClip's z-test is False for NaN, which
then poisons them for the rest of the run), and only applied steps move them (`commit()` after the guard's
verdict), so a skipped step leaves the clipper as if its batch had never been drawn."""

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
        self.seen = self.n_clipped = 0  # seen: norms committed; the first `warmup` only build the averages

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
        delta = kept - self.mean
        if self.seen <= self.warmup:  # plain running mean and variance over the warm-up norms
            self.mean += delta / self.seen
            self.var += (delta * (kept - self.mean) - self.var) / self.seen
        else:
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
    """Clip this rank's gradients in place to `clip_norm` and record `norm` (on the device: `device_norm`)."""
    limit = clip_norm(grad_clip, clipper, norm)
    if clipper is not None:
        clipper.commit(norm)
    if math.isfinite(limit) and grads:  # clip_grads_with_norm_'s arithmetic, on the local parts
        coef = torch.clamp(limit / (device_norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device))
