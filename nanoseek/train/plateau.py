"""Plateau detection: a run whose loss sits at the unigram entropy has learned token frequencies and nothing else.

With clipped gradients, too high an LR rarely ends in a NaN: it knocks the model into ignoring the context and
its loss settles at H(unigram) = -sum_v p(v) log p(v), the best a context-free predictor can do. Such a run is
lost although nothing non-finite shows. The faster failure of the same cause, a loss climbing `DIVERGED_NATS`
above the first, is divergence (Wortsman et al. 2023, arXiv 2309.14322, count such a run at its initial loss);
it shows within a few steps, long before a plateau can be told from slow progress. The loss EMA sees only
finite losses of applied steps, so no NaN enters it and a skipped step stays as if its batch was never drawn."""

import math
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from nanoseek.data.shards import read_tokens

DIVERGED_NATS = 0.5  # a loss EMA this far above the first loss has diverged (healthy runs never climb above it)
UNIGRAM_SAMPLE_TOKENS = 1 << 22  # 4M tokens pin the unigram entropy to well under 0.01 nats for a 32K vocab


def unigram_entropy(shards: Iterable[str | Path], vocab_size: int,
                    max_tokens: int | None = UNIGRAM_SAMPLE_TOKENS) -> float:
    """Entropy in nats of the token frequencies in (the first `max_tokens` of) the training shards."""
    counts = np.bincount(read_tokens(shards, max_tokens), minlength=vocab_size)
    p = counts[counts > 0] / max(int(counts.sum()), 1)
    return float(-(p * np.log(p)).sum())


class PlateauDetector:
    """Flags a training loss stuck at the unigram entropy after warm-up, or diverging."""

    def __init__(self, unigram: float, start: int, margin: float = 0.1, patience: int = 50,
                 min_gain: float = 0.1, ema: float = 0.9):
        self.unigram, self.start, self.margin = unigram, start, margin
        self.patience, self.min_gain, self.ema_coef = patience, min_gain, ema
        self.ema: float | None = None
        self.best = math.inf  # the lowest EMA so far
        self.bests: deque[float] = deque(maxlen=patience + 1)  # `best` after each of the last applied steps
        self.applied = 0
        self.initial: float | None = None  # the run's first loss (kept across rollbacks)

    def observe(self, loss: float) -> str | None:
        """Record an applied step's loss; the reason when the run diverged or is on the plateau (after `start`
        steps, its EMA within `margin` of the unigram level or above, its lowest moved < `min_gain` in `patience`)."""
        if not math.isfinite(loss):
            return None  # never averaged: the guard skips such a step anyway
        self.applied += 1
        self.initial = loss if self.initial is None else self.initial
        self.ema = loss if self.ema is None else self.ema_coef * self.ema + (1 - self.ema_coef) * loss
        if self.ema > self.initial + DIVERGED_NATS:
            return (f"loss diverged (loss {self.ema:.3f}, {self.ema - self.initial:.2f} above the first step's "
                    f"{self.initial:.3f})")
        self.best = min(self.best, self.ema)
        self.bests.append(self.best)
        # Progress is how far the lowest loss moved, not how far the loss fell since `patience` steps ago: a model
        # knocked above the unigram level that relearns token frequencies descends, but towards the plateau.
        gain = self.bests[0] - self.best
        full = len(self.bests) > self.patience
        if self.applied >= self.start and full and gain < self.min_gain and self.ema > self.unigram - self.margin:
            return (f"loss plateau at the unigram level (loss {self.ema:.3f} vs unigram entropy {self.unigram:.3f}, "
                    f"lowest loss moved {gain:.3f} in {self.patience} steps)")
        return None

    @property
    def below_unigram(self) -> bool:
        """The loss EMA is clearly below the unigram level: the weights learned more than token counts."""
        return self.ema is not None and self.ema < self.unigram - self.margin

    def reset(self) -> None:
        """After a rollback: the restored weights start a fresh history."""
        self.ema, self.best = None, math.inf
        self.bests.clear()

    def state_dict(self) -> dict:
        return {"ema": self.ema, "best": self.best, "bests": list(self.bests), "applied": self.applied,
                "initial": self.initial}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.best = state["ema"], float(state["best"])
        self.bests = deque(state["bests"], maxlen=self.patience + 1)
        self.applied = int(state["applied"])
        self.initial = state.get("initial")
