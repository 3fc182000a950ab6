"""What `--inject KIND@STEP` means (config.py parses it before any data is prepared; train/faults.py injects it).

Kinds: nan-loss, nan-grad, inf-grad, inf-act:MODULE_PATH (a `named_modules()` path such as `layers.1.attn`),
lr-spike:FACTOR, bad-batch (token ids past the vocabulary). Each fires once, at the step (data batch index) it
names, on every rank, or with `:rankR` (`nan-grad@5:rank1`) on rank R only: that is how a test proves that one
rank's NaN makes every rank skip."""

import math
from dataclasses import dataclass

KINDS = ("nan-loss", "nan-grad", "inf-grad", "inf-act", "lr-spike", "bad-batch")
USAGE = "write KIND@STEP, e.g. nan-loss@12, inf-act:layers.1.ffn@5, lr-spike:100@40, nan-grad@5:rank1"


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    arg: str = ""  # module path for inf-act, factor for lr-spike
    rank: int | None = None  # fire on this data-parallel rank only; None: on every rank

    def __str__(self) -> str:
        where = f":rank{self.rank}" if self.rank is not None else ""
        return f"{self.kind}{':' + self.arg if self.arg else ''}@{self.step}{where}"


def parse_fault(spec: str) -> Fault:
    head, sep, tail = spec.rpartition("@")
    step, _, where = tail.partition(":")
    kind, _, arg = head.partition(":")
    if not sep or not step:
        raise ValueError(f"--inject {spec!r}: missing @STEP; {USAGE}")
    if not step.isdigit():
        raise ValueError(f"--inject {spec!r}: the step after @ must be a whole number, not {step!r}; {USAGE}")
    if where and not (where.startswith("rank") and where[4:].isdigit()):
        raise ValueError(f"--inject {spec!r}: {where!r} after @STEP must be rankN (the rank to fire on); {USAGE}")
    rank = int(where[4:]) if where else None
    if kind not in KINDS:
        raise ValueError(f"--inject {spec!r}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "inf-act" and not arg:
        raise ValueError(f"--inject {spec!r}: inf-act needs a module path, e.g. inf-act:layers.0.attn@5")
    if arg and kind not in ("inf-act", "lr-spike"):
        raise ValueError(f"--inject {spec!r}: {kind} takes no argument; write {kind}@{step}")
    if kind == "lr-spike" and rank is not None:  # ranks with different LRs would silently drift apart
        raise ValueError(f"--inject {spec!r}: lr-spike acts on every rank alike; drop ':rank{rank}'")
    if kind == "lr-spike":
        try:
            if not 0 < float(arg) < math.inf:  # also rejects nan
                raise ValueError
        except ValueError:
            raise ValueError(f"--inject {spec!r}: lr-spike needs a positive factor, e.g. lr-spike:100@40") from None
    return Fault(kind, int(step), arg, rank)
