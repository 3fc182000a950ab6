"""StabilityGuard: judge every step before it touches the weights.

`check(stats)` runs after backward and before clipping, the optimizer, the GradScaler and the MoE bias update:
- ok       -- apply the step.
- skip     -- non-finite loss or gradient, an out-of-range batch, an LR that is not a finite float32 (checked
              even with the guard off: it could only write NaN weights), or a loss / grad-norm spike over the
              rolling window (OLMo-core style; spikes are kept out of the window). Nothing changes but the
              data position.
- rollback -- `max_skips` skips within `window` steps (grad-norm spikes do not count: with finite gradients
              and a steady loss the weights are fine) or two loss spikes in a row (the weights, not the data,
              are bad): LR times `rollback_lr_factor`. Also a loss (stats.ce) stuck at the unigram level or
              diverging (train/plateau.py), or attention logits growing past `attn_logit_limit` (Wortsman et
              al. 2023, arXiv 2309.14322): LR times `plateau_lr_factor`, after logit growth under Muon only
              the Muon group's, whose updates drive the logits. Every rollback restores the last
              verified-good snapshot and leaves the data window that led into the trouble behind (PaLM,
              arXiv 2204.02311, section 5.1).
- abort    -- more than `max_rollbacks` rollbacks: stop with a final checkpoint and a report.
- overflow -- fp16 only: the GradScaler saw inf gradients and lowers its scale; the scaler working, not a fault."""

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanoseek.config import GuardConfig
from nanoseek.train.plateau import PlateauDetector


@dataclass
class RankView:
    """One rank's own side of a step (the global numbers hide which rank a fault began on)."""

    batch_ok: bool = True
    loss: torch.Tensor | None = None  # this rank's mean loss; None when no forward ran
    grad_norm: torch.Tensor | None = None  # the norm of this rank's gradients (its shards under FSDP)


@dataclass
class StepStats:
    """What one step is judged by: the same numbers on every rank (global means and grad norm)."""

    step: int
    loss: float
    grad_norm: float  # unclipped; NaN when no forward ran
    batch_ok: bool = True  # False: some rank holds token ids outside [0, vocab_size), nothing ran
    values: dict[str, float] = field(default_factory=dict)  # for the metrics: loss components, grad_norm, lr, ...
    device_grad_norm: torch.Tensor | None = None  # grad_norm still on the device, for clipping without a sync
    rank: RankView = field(default_factory=RankView)
    lrs: list[float] = field(default_factory=list)  # each parameter group's LR for this update (host floats)
    ce: float | None = None  # next-token CE, else the objective's loss (plateau/divergence check); None: no forward
    attn_logit_max: float | None = None  # max attention logit over layers and heads, on sampled steps only


@dataclass
class Verdict:
    action: str  # ok | skip | rollback | abort | overflow
    cause: str = ""  # why, in words for the log
    value: float = 0.0
    module: str | None = None  # where a non-finite value began, once the NaN locator has named it

    @property
    def ok(self) -> bool:
        return self.action == "ok"


class RollingStats:
    """Mean and std of the last `size` healthy values (plain floats; no tensors, no syncs)."""

    def __init__(self, size: int):
        self.values: deque[float] = deque(maxlen=size)

    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    def z_score(self, value: float) -> float:
        mean = self.mean()
        std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / max(len(self.values) - 1, 1))
        return (value - mean) / max(std, 0.02 * abs(mean), 1e-6)  # a flat window must not turn noise into a spike


class StabilityGuard:
    """Keeps the statistics and counters behind each verdict; its state is saved in checkpoints."""

    # A spike must also be this far above the window mean, so a tight window cannot flag noise.
    MIN_SPIKE_RATIO = {"loss": 1.1, "grad_norm": 2.0}
    # Runaway growth, not level, within `window` steps: a runaway LR multiplies the logits in tens of steps, while a
    # healthy run may drift past the limit slowly and a pretrained model start above it (bench/RESULTS.md).
    ATTN_LOGIT_GROWTH = 8.0

    def __init__(self, cfg: GuardConfig, precision: str = "fp32", grad_spikes_clipped: bool = False,
                 attention_groups: tuple[str, ...] = ()):
        self.cfg, self.precision = cfg, precision
        self.stats = {name: RollingStats(cfg.window) for name in ("loss", "grad_norm")}
        self.recent_skips: deque[int] = deque()
        self.consecutive_spikes = self.n_skips = self.n_rollbacks = 0
        self.lr_scale = 1.0
        self.group_lr_scale: dict[str, float] = {}  # per optimizer group (by name), on top of lr_scale
        self.attention_groups = attention_groups  # the groups updating the attention matrices (Muon's); empty: all
        self.rollback_groups: tuple[str, ...] = ()  # the groups the next rollback lowers (empty: all)
        self.rollback_factor = cfg.rollback_lr_factor  # the next rollback's LR factor
        self.plateau: PlateauDetector | None = None
        self.grad_spikes_clipped = grad_spikes_clipped  # adaptive clipping (train/clipping.py) is on
        self.recent_attn_logits: deque[tuple[int, float]] = deque()  # (step, sampled max attention logit)

    def watch_plateau(self, unigram: float | Callable[[], float] | None, start: int) -> None:
        """Treat a loss stuck at `unigram` nats (a function is called only if detection is on) after `start` applied
        steps, or diverging, as a fault. None: a loss with no unigram level (distillation's KL), watched for
        divergence only."""
        if self.cfg.enabled and self.cfg.plateau_margin > 0:
            unigram = unigram() if callable(unigram) else unigram
            unigram = math.inf if unigram is None else unigram  # never "at the plateau", always "below" it
            self.plateau = PlateauDetector(unigram, start, self.cfg.plateau_margin, self.cfg.plateau_patience)

    @property
    def worth_keeping(self) -> bool:
        """With plateau detection on, the weights are a rollback target only once the loss is below unigram level."""
        return self.plateau is None or self.plateau.below_unigram

    def check(self, stats: StepStats) -> Verdict:
        """Judge one step and update the counters."""
        step, loss, grad_norm = stats.step, stats.loss, stats.grad_norm
        refused = self.check_update(step, stats.lrs)  # even with the guard off: it could only write NaN weights
        if refused is not None:
            return refused
        if not self.cfg.enabled:
            return Verdict("ok")
        if not stats.batch_ok:
            return self._skip(step, "bad batch: token ids outside [0, vocab_size)", math.nan)
        if not math.isfinite(loss):
            return self._skip(step, "non-finite loss", loss)
        if not math.isfinite(grad_norm):
            if self.precision == "fp16":
                return Verdict("overflow", "fp16 gradient overflow (GradScaler lowers its scale)", grad_norm)
            return self._skip(step, "non-finite gradient", grad_norm)
        # With adaptive clipping on, a grad-norm outlier is clipped to its z-bound rather than skipped, so the
        # batch still teaches (ZClip, arXiv 2504.02507); the grad norm then only feeds the window.
        watched = (("loss", loss),) if self.grad_spikes_clipped else (("loss", loss), ("grad_norm", grad_norm))
        for name, value in watched:
            window = self.stats[name]
            if len(window.values) < max(self.cfg.warmup, 2):
                continue
            z = window.z_score(value)
            if z <= self.cfg.spike_sigma or value <= self.MIN_SPIKE_RATIO[name] * window.mean():
                continue
            cause = f"{name} spike ({z:.1f} sigma above the last {len(window.values)} steps)"
            if name == "grad_norm":
                # Only a loss that stays high says the weights are damaged: a grad-norm spike alone is skipped but
                # never counts towards a rollback, and joins the window, so a real shift in scale is absorbed.
                window.values.append(value)
                self.n_skips += 1
                return Verdict("skip", cause, value)
            verdict = self._skip(step, cause, value)
            self.consecutive_spikes += 1
            if verdict.action == "skip" and self.consecutive_spikes >= 2:
                return self._escalate(f"loss stays high ({self.consecutive_spikes} spikes in a row)", value)
            return verdict
        self.consecutive_spikes = 0
        cause = self.attention_logit_growth(step, stats.attn_logit_max)
        if cause is not None:
            self.rollback_groups = self.attention_groups
        elif self.plateau is not None and stats.ce is not None:
            cause = self.plateau.observe(stats.ce)
        if cause:
            self.rollback_factor = self.cfg.plateau_lr_factor
            return self._escalate(cause, loss)
        self.stats["loss"].values.append(loss)
        self.stats["grad_norm"].values.append(grad_norm)
        return Verdict("ok")

    def attention_logit_growth(self, step: int, value: float | None) -> str | None:
        """A cause when the sampled max attention logit `value` (None: not sampled this step) is past
        `attn_logit_limit` and more than ATTN_LOGIT_GROWTH times the lowest sample of the last `window` steps."""
        if self.cfg.attn_logit_limit <= 0 or value is None or not math.isfinite(value):
            return None  # a non-finite logit comes with a non-finite loss, which is skipped
        recent = self.recent_attn_logits
        while recent and recent[0][0] <= step - self.cfg.window:
            recent.popleft()
        lowest = min((v for _, v in recent), default=value)
        recent.append((step, value))
        if value <= self.cfg.attn_logit_limit or value <= self.ATTN_LOGIT_GROWTH * lowest:
            return None
        return (f"attention logits grew to {value:.3g} from {lowest:.3g} within {self.cfg.window} steps, past "
                f"{self.cfg.attn_logit_limit:g} (--guard.attn-logit-limit)")

    def check_update(self, step: int, lrs: list[float]) -> Verdict | None:
        """Before the optimizer step (host floats, no sync): an LR that is not a finite float32 would write
        NaN/Inf into every weight it touches, however finite the gradients are. None: the update may go on."""
        bad = next((lr for lr in lrs if not math.isfinite(lr) or abs(lr) > torch.finfo(torch.float32).max), None)
        return None if bad is None else self._skip(step, f"non-finite learning rate ({bad:g})", bad)

    def _skip(self, step: int, cause: str, value: float) -> Verdict:
        self.n_skips += 1
        skips = self.recent_skips
        skips.append(step)
        while skips and skips[0] <= step - self.cfg.window:
            skips.popleft()
        if len(skips) >= self.cfg.max_skips:
            return self._escalate(f"{len(skips)} skips within {self.cfg.window} steps, last: {cause}", value)
        return Verdict("skip", cause, value)

    def _escalate(self, cause: str, value: float) -> Verdict:
        if self.n_rollbacks < self.cfg.max_rollbacks:
            return Verdict("rollback", cause, value)
        return Verdict("abort", f"{cause}; rollbacks exhausted ({self.n_rollbacks}/{self.cfg.max_rollbacks})", value)

    def rolled_back(self) -> None:
        """Called by the trainer once a rollback is done: lower the LR, start fresh counters."""
        self.n_rollbacks += 1
        for name in self.rollback_groups:
            self.group_lr_scale[name] = self.group_lr_scale.get(name, 1.0) * self.rollback_factor
        if not self.rollback_groups:
            self.lr_scale *= self.rollback_factor
        self.rollback_factor, self.rollback_groups = self.cfg.rollback_lr_factor, ()
        self.recent_skips.clear()
        self.recent_attn_logits.clear()  # the restored weights' logits are not the ones sampled since
        self.consecutive_spikes = 0
        if self.plateau is not None:
            self.plateau.reset()

    @property
    def lr_note(self) -> str:
        """What the rollbacks left of the LR, for the log: "lr x0.1", or "lr x1, muon lr x0.01"."""
        return f"lr x{self.lr_scale:g}" + "".join(f", {g} lr x{s:g}" for g, s in self.group_lr_scale.items())

    def state_dict(self) -> dict:
        return {"loss": list(self.stats["loss"].values), "grad_norm": list(self.stats["grad_norm"].values),
                "recent_skips": list(self.recent_skips), "consecutive_spikes": self.consecutive_spikes,
                "n_skips": self.n_skips, "n_rollbacks": self.n_rollbacks, "lr_scale": self.lr_scale,
                "group_lr_scale": dict(self.group_lr_scale),
                "plateau": self.plateau.state_dict() if self.plateau is not None else None,
                "recent_attn_logits": [list(pair) for pair in self.recent_attn_logits]}

    def load_state_dict(self, state: dict) -> None:
        for name in ("loss", "grad_norm"):
            self.stats[name].values = deque(state[name], maxlen=self.cfg.window)
        self.recent_skips = deque(state["recent_skips"])
        self.consecutive_spikes, self.lr_scale = state["consecutive_spikes"], state["lr_scale"]
        self.n_skips, self.n_rollbacks = state["n_skips"], state["n_rollbacks"]
        self.group_lr_scale = dict(state.get("group_lr_scale", {}))  # .get: older checkpoints lack these two
        self.recent_attn_logits = deque(tuple(pair) for pair in state.get("recent_attn_logits", []))
        if self.plateau is not None and state.get("plateau") is not None:
            self.plateau.load_state_dict(state["plateau"])
