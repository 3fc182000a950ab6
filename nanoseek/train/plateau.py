"""Plateau detection: a run whose loss sits at the unigram entropy has learned token frequencies and nothing else.

Too high a learning rate rarely ends in a NaN when gradients are clipped: the model is knocked into a state
where its output ignores the context (saturated attention, dead residual branches) and its loss settles at
H(unigram) = -sum_v p(v) log p(v) of the training tokens, the best a context-free predictor can do. Such a run is
lost as surely as one that went NaN, but nothing non-finite ever shows. `PlateauDetector` calls it: after
`start` applied steps, if an EMA of the training loss is within `margin` nats of the unigram entropy (or above
it) and has made no new low (by `min_gain`) for `patience` steps, the run is on the plateau. A slow run (low LR)
still descending through the unigram level is not flagged: it keeps making new lows.

The same detector calls the faster failure of the same cause: a loss EMA that climbs `DIVERGED_NATS` above the
run's first loss has diverged (Wortsman et al. 2023, arXiv 2309.14322, count such a run at its initial loss).
Measured at LR 1.0 (bench/instability_lab.py) this shows within the first 5 steps, long before a plateau could
be told from slow progress, so the rollback costs a few steps instead of a third of the run.

The EMA sees finite losses of applied steps only (a skipped step leaves it untouched), so no NaN can ever enter
it, and a skip stays equivalent to leaving the batch out. Cost: one float update per step on the host, plus
one bincount over (a prefix of) the training tokens at start-up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from nanoseek.data.shards import read_tokens

DIVERGED_NATS = 0.5  # a loss EMA this far above the first loss has diverged (healthy runs never climb above it)
UNIGRAM_SAMPLE_TOKENS = 1 << 22  # 4M tokens pin the unigram entropy to well under 0.01 nats for a 32K vocab


def unigram_entropy(shards: Iterable[str | Path], vocab_size: int, max_tokens: int = UNIGRAM_SAMPLE_TOKENS) -> float:
    """Entropy in nats of the token frequencies in (the first `max_tokens` of) the training shards."""
    tokens = read_tokens(shards, max_tokens)
    counts = np.bincount(tokens, minlength=vocab_size)
    p = counts[counts > 0] / max(int(counts.sum()), 1)
    return float(-(p * np.log(p)).sum())


class PlateauDetector:
    """Flags a training loss stuck at the unigram entropy after warm-up (see the module docstring)."""

    def __init__(self, unigram: float, start: int, margin: float = 0.1, patience: int = 50,
                 min_gain: float = 0.02, ema: float = 0.9):
        self.unigram, self.start, self.margin = unigram, start, margin
        self.patience, self.min_gain, self.ema_coef = patience, min_gain, ema
        self.ema: float | None = None
        self.best = math.inf  # the lowest EMA so far ...
        self.best_at = 0  # ... last lowered by min_gain at this applied step
        self.applied = 0
        self.initial: float | None = None  # the run's first loss (kept across rollbacks)

    def observe(self, loss: float) -> str | None:
        """Record an applied step's loss; returns the reason when the run sits on the plateau, else None."""
        if not math.isfinite(loss):
            return None  # never averaged: the guard skips such a step anyway
        self.applied += 1
        self.initial = loss if self.initial is None else self.initial
        self.ema = loss if self.ema is None else self.ema_coef * self.ema + (1 - self.ema_coef) * loss
        if self.ema > self.initial + DIVERGED_NATS:
            return f"loss diverged (loss {self.ema:.3f}, {self.ema - self.initial:.2f} above the first step's {self.initial:.3f})"
        if self.ema < self.best - self.min_gain:
            self.best, self.best_at = self.ema, self.applied
        # Progress is a new low, not a lower value than `patience` steps ago: a model knocked above the unigram
        # level that slowly relearns token frequencies is descending, but towards the plateau, not past it.
        stalled = self.applied - self.best_at >= self.patience
        if self.applied >= self.start and stalled and self.ema > self.unigram - self.margin:
            return (f"loss plateau at the unigram level (loss {self.ema:.3f} vs unigram entropy {self.unigram:.3f}, "
                    f"no new low by {self.min_gain} in {self.applied - self.best_at} steps)")
        return None

    @property
    def below_unigram(self) -> bool:
        """The loss EMA is clearly below the unigram level: the weights have learned more than token counts,
        so they are worth keeping as a rollback target (a model knocked onto the plateau early is not)."""
        return self.ema is not None and self.ema < self.unigram - self.margin

    def reset(self) -> None:
        """After a rollback: the restored weights start a fresh history."""
        self.ema, self.best, self.best_at = None, math.inf, self.applied

    def state_dict(self) -> dict:
        return {"ema": self.ema, "best": self.best, "best_at": self.best_at, "applied": self.applied,
                "initial": self.initial}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.best = state["ema"], float(state["best"])
        self.best_at, self.applied = int(state["best_at"]), int(state["applied"])
        self.initial = state.get("initial")
