"""Fault injection (`--inject KIND@STEP`), to prove a setup survives what it claims to survive.

Kinds: nan-loss, nan-grad, inf-grad, inf-act:MODULE_PATH (a `named_modules()` path such as
`layers.1.attn`), lr-spike:FACTOR, bad-batch (token ids past the vocabulary). Each fires once,
at the step (data batch index) it names. Under torchrun a fault fires on every rank unless the spec
ends in `:rankR` (`nan-grad@5:rank1`): then only on rank R, which is how a test proves that one rank's
NaN makes every rank skip.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from nanoseek.train.distributed import local

KINDS = ("nan-loss", "nan-grad", "inf-grad", "inf-act", "lr-spike", "bad-batch")


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
    usage = "write KIND@STEP, e.g. nan-loss@12, inf-act:layers.1.ffn@5, lr-spike:100@40, nan-grad@5:rank1"
    head, sep, tail = spec.rpartition("@")
    step, _, where = tail.partition(":")
    if not sep or not step:
        raise ValueError(f"--inject {spec!r}: missing @STEP; {usage}")
    if not step.isdigit():
        raise ValueError(f"--inject {spec!r}: the step after @ must be a whole number, not {step!r}; {usage}")
    rank = None
    if where:
        if not (where.startswith("rank") and where[4:].isdigit()):
            raise ValueError(f"--inject {spec!r}: {where!r} after @STEP must be rankN (the rank to fire on); {usage}")
        rank = int(where[4:])
    kind, _, arg = head.partition(":")
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


class FaultInjector:
    """Applies parsed faults at their steps; the trainer calls one method per stage of a step.

    `rank` / `world_size`: this process' data-parallel rank; faults selected for another rank stay quiet.
    """

    def __init__(self, specs: tuple[str, ...] | list[str], model: nn.Module, rank: int = 0, world_size: int = 1):
        self.faults = [parse_fault(s) for s in specs]
        for fault in self.faults:
            if fault.rank is not None and fault.rank >= world_size:
                raise ValueError(f"--inject {fault}: there is no rank {fault.rank} in a run of {world_size} "
                                 f"process(es); pick a rank below {world_size} or drop ':rank{fault.rank}'")
        self.rank, self.world_size = rank, world_size
        modules = dict(model.named_modules())
        for fault in self.faults:
            if fault.kind == "inf-act" and fault.arg not in modules:
                names = [name for name in modules if name]
                near = (difflib.get_close_matches(fault.arg, names, n=5, cutoff=0.6)
                        or [name for name in names if fault.arg.split(".")[-1] in name][:5])
                raise ValueError(f"--inject {fault}: model has no module {fault.arg!r}"
                                 f"{'; similar: ' + ', '.join(near) if near else ''}")
        self.modules = modules

    def _here(self, fault: Fault, step: int) -> bool:
        return fault.step == step and fault.rank in (None, self.rank)

    def _at(self, step: int, *kinds: str) -> list[Fault]:
        return [f for f in self.faults if self._here(f, step) and f.kind in kinds]

    def active(self, step: int) -> list[str]:
        return [str(f) for f in self.faults if self._here(f, step)]

    def batch(self, step: int, x: torch.Tensor, vocab_size: int) -> torch.Tensor:
        if self._at(step, "bad-batch"):
            x = x.clone()
            x[:, ::2] = vocab_size + 7  # garbage ids past the vocabulary, as a corrupt shard would give
        return x

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self._at(step, "nan-loss") else loss

    @torch.no_grad()
    def grads(self, step: int, model: nn.Module) -> None:
        for fault in self._at(step, "nan-grad", "inf-grad"):
            value = float("nan") if fault.kind == "nan-grad" else float("inf")
            for param in model.parameters():
                # Under FSDP the gradient is a DTensor: poison this rank's shard (indexing the DTensor
                # itself would be a collective that the other ranks never join).
                grad = local(param.grad)
                if grad is not None and grad.numel():
                    grad.view(-1)[0] = value
                    break

    def lr_factor(self, step: int) -> float:
        factor = 1.0
        for fault in self._at(step, "lr-spike"):
            factor *= float(fault.arg)
        return factor

    @contextlib.contextmanager
    def activations(self, step: int) -> Iterator[None]:
        """While active, the named modules' outputs get an inf in their first element."""
        handles = [self.modules[f.arg].register_forward_hook(_poison_output) for f in self._at(step, "inf-act")]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _poison_output(module: nn.Module, args, output):
    # Every floating-point tensor of a tuple output, not just the first: an MTP module returns
    # (h for the next depth, normed output), and at the last depth h is never used, so poisoning
    # only output[0] would inject nothing.
    def poison(tensor):
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
            return tensor
        poisoned = tensor.clone()
        poisoned[(0,) * poisoned.dim()] = float("inf")  # indexing, not view(-1): any strides
        return poisoned
    return tuple(poison(t) for t in output) if isinstance(output, tuple) else poison(output)
