"""Fault injection (`--inject KIND@STEP`, parsed by nanoseek/fault_spec.py), to prove a setup survives what
it claims to survive: wrappers around the part of a step each kind breaks, so the trainer holds no injection
code. nan-grad and inf-grad wrap the GradScaler's unscale, the first thing after DDP/FSDP's gradient sync, so a
one-rank fault stays on that rank."""

import contextlib
import dataclasses
import difflib
import math
from typing import Callable

import torch
from torch import nn

from nanoseek.fault_spec import KINDS, Fault, parse_fault
from nanoseek.train.distributed import local


class FaultInjector:
    """Applies parsed faults (for this process' `rank`) at their steps: one method per kind; `wrap_*` install them."""

    def __init__(self, specs: tuple[str, ...] | list[str], model: nn.Module, rank: int = 0, world_size: int = 1):
        self.faults = [parse_fault(s) for s in specs]
        for fault in self.faults:
            if fault.rank is not None and fault.rank >= world_size:
                raise ValueError(f"--inject {fault}: there is no rank {fault.rank} in a run of {world_size} "
                                 f"process(es); pick a rank below {world_size} or drop ':rank{fault.rank}'")
        self.rank, self.world_size = rank, world_size
        self.modules = dict(model.named_modules())
        for fault in self.faults:
            if fault.kind == "inf-act" and fault.arg not in self.modules:
                names = [name for name in self.modules if name]
                near = (difflib.get_close_matches(fault.arg, names, n=5, cutoff=0.6)
                        or [name for name in names if fault.arg.split(".")[-1] in name][:5])
                raise ValueError(f"--inject {fault}: model has no module {fault.arg!r}"
                                 f"{'; similar: ' + ', '.join(near) if near else ''}")

    def _at(self, step: int, *kinds: str) -> list[Fault]:
        return [f for f in self.faults if f.step == step and f.rank in (None, self.rank) and f.kind in kinds]

    def active(self, step: int) -> list[str]:
        return [str(f) for f in self._at(step, *KINDS)]

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
                # This rank's shard of an FSDP DTensor: indexing the DTensor is a collective the others never join.
                grad = local(param.grad)
                if grad is not None and grad.numel():
                    grad.view(-1)[0] = value
                    break

    def lr_factor(self, step: int) -> float:
        return math.prod((float(fault.arg) for fault in self._at(step, "lr-spike")), start=1.0)

    def activations(self, step: int) -> contextlib.ExitStack:
        """A context in which the named modules' outputs get an inf in their first element."""
        hooks = contextlib.ExitStack()
        for fault in self._at(step, "inf-act"):
            hooks.enter_context(self.modules[fault.arg].register_forward_hook(_poison_output))
        return hooks

    def wrap_loader(self, loader, progress, vocab_size: int):
        """bad-batch: the loader's batches of the step get ids past the vocabulary."""
        def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
            x, y = loader.next_batch()
            return self.batch(progress.step, x, vocab_size), y
        return _Wrapped(loader, next_batch=next_batch)

    def wrap_objective(self, objective: Callable, progress) -> Callable:
        """inf-act and nan-loss: in the objective's forward, and on its total loss."""
        def objective_with_faults(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
            with self.activations(progress.step):
                out = objective(model, x, y)
            return dataclasses.replace(out, loss=self.loss(progress.step, out.loss))
        return objective_with_faults

    def wrap_schedule(self, schedule: Callable[[int], float], progress) -> Callable[[int], float]:
        """lr-spike: the LR factor of the step times the spike."""
        return lambda opt_step: schedule(opt_step) * self.lr_factor(progress.step)

    def wrap_scaler(self, scaler: torch.amp.GradScaler, progress, model: nn.Module):
        """nan-grad and inf-grad: one gradient element poisoned as unscale_ starts, before it looks for infs."""
        def unscale_(optimizer: torch.optim.Optimizer) -> None:
            self.grads(progress.step, model)
            scaler.unscale_(optimizer)
        return _Wrapped(scaler, unscale_=unscale_)


class _Wrapped:
    """`inner` with some methods replaced; everything else (state_dict, skip, ...) is inner's own."""

    def __init__(self, inner, **methods: Callable):
        self.inner = inner
        vars(self).update(methods)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _poison_output(module: nn.Module, args, output):
    # Every floating-point tensor of a tuple: an MTP module returns (h for the next depth, normed output), and
    # at the last depth h is never used, so poisoning only output[0] would inject nothing.
    def poison(tensor):
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
            return tensor
        poisoned = tensor.clone()
        poisoned[(0,) * poisoned.dim()] = float("inf")  # indexing, not view(-1): any strides
        return poisoned
    return tuple(poison(t) for t in output) if isinstance(output, tuple) else poison(output)
