"""Optimizers (AdamW, Lion, Muon), each ONE `torch.optim.Optimizer`, their parameter groups, and the LR schedule.

Weight decay goes on 2-D+ weight matrices other than embeddings (anything an `nn.Embedding` owns): decaying a norm
gain or a bias pulls it towards a value with no special meaning, and decaying embeddings of rare tokens shrinks them
between their rare gradients (nanoGPT `configure_optimizers`; Loshchilov & Hutter 2019 for the decoupled form)."""

import math
from typing import Iterable

import torch
from torch import nn

from nanoseek.config import TrainConfig
from nanoseek.train.hardware import cpu_has_amx

# Modules whose weight is an output projection onto the vocabulary. Muon leaves them to AdamW
# (Jordan et al. 2024: "embedding and final classifier head ... should be optimized by AdamW").
OUTPUT_HEAD_NAMES = ("head", "lm_head", "output")

# Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks": quintic Newton-Schulz
# coefficients chosen to maximise the slope at 0 while keeping singular values in roughly [0.7, 1.2];
# 5 iterations suffice, and Nesterov momentum 0.95.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
MUON_MOMENTUM = 0.95
# At most this many elements per batched Newton-Schulz call: the stacked directions are a transient copy.
NS_BATCH_ELEMENTS = 1 << 24


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The trainable parameters of `model` in groups tagged `name` ("decay", "no_decay", "muon": for logs and
    per-group LR) and `base_lr` (the peak LR). A tied parameter appears once, classified by the module that
    owns it first, except that anything owned by an `nn.Embedding` counts as an embedding."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    heads = {id(p) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in OUTPUT_HEAD_NAMES
             for p in m.parameters(recurse=False)}
    decay, no_decay, muon = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in embeddings or name.rsplit(".", 1)[-1] == "bias":
            no_decay.append(p)
        elif cfg.optimizer == "muon" and id(p) not in heads:
            muon.append(p)
        else:
            decay.append(p)
    lr, betas = dict(lr=cfg.lr, base_lr=cfg.lr), (cfg.beta1, cfg.beta2)
    groups = [dict(name="decay", params=decay, **lr, weight_decay=cfg.weight_decay, betas=betas),
              dict(name="no_decay", params=no_decay, **lr, weight_decay=0.0, betas=betas)]
    if cfg.optimizer == "muon":  # momentum, Nesterov and ns_steps: Muon's defaults
        groups = [dict(name="muon", params=muon, lr=cfg.muon_lr, base_lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                       use_muon=True), *(dict(group, use_muon=False) for group in groups)]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, Lion, or Muon (2-D+ hidden matrices; AdamW for the rest) over `param_groups`, which set each lr."""
    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False); "
                         "unfreeze some parameters before building the optimizer")
    if cfg.optimizer == "adamw":
        # torch's fused AdamW (one kernel instead of ~10 foreach ops, on CPU too since torch 2.4): the same
        # update up to rounding, and faster (bench/RESULTS.md, "Fast paths"). Needs float CPU/CUDA parameters.
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, eps=cfg.eps, fused=fused or None)
    if cfg.optimizer == "lion":
        return Lion(groups)
    if cfg.optimizer == "muon":
        return Muon(groups, eps=cfg.eps)
    raise ValueError(f"optimizer={cfg.optimizer!r}: unknown; choose 'adamw', 'lion' or 'muon'")


def apply_lr_factor(optimizer: torch.optim.Optimizer, factor: float,
                    group_scale: dict[str, float] | None = None) -> None:
    """Set every group's LR to its `base_lr` times `factor` (from `lr_factor`), times `group_scale[name]`
    where given (the guard's per-group LR backoff)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor * (group_scale or {}).get(group.get("name"), 1.0)


def _call_closure(closure):
    """torch.optim's closure protocol: re-evaluate the loss with gradients on (steps run under no_grad)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _state(state: dict, p: torch.Tensor, name: str) -> torch.Tensor:
    if name not in state:
        state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state[name]


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675, Alg. 2).

    update = sign(beta1 * m + (1 - beta1) * g); p <- p * (1 - lr * wd) - lr * update; m <- beta2 * m + (1 - beta2) * g.
    Every coordinate moves by exactly lr, so the paper uses an LR 3-10x smaller than AdamW's and a weight
    decay 3-10x larger (keeping lr * wd). One state tensor (`exp_avg`) per parameter instead of AdamW's two."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"Lion lr={lr}: must be > 0")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _call_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                exp_avg = _state(self.state[p], p, "exp_avg")
                update = exp_avg.lerp(p.grad, 1 - beta1).sign_()
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr)
                exp_avg.lerp_(p.grad, 1 - beta2)
        return loss


def _fast_bf16(t: torch.Tensor) -> bool:
    """bf16 matmuls are fast on CUDA and on CPUs with AMX; elsewhere they are emulated."""
    return t.is_cuda or (t.device.type == "cpu" and cpu_has_amx())


def newton_schulz(grad: torch.Tensor, steps: int = NS_STEPS, work_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately orthogonalise the last two dims of `grad`: U S V^T -> U S' V^T with S' near 1.

    grad: [..., rows, cols], leading dims a batch (e.g. stacked experts [E, out, in]); same shape and dtype out.
    The quintic iteration X <- aX + (bA + cA^2)X, A = XX^T (the smaller Gram matrix: X is made wide), pushes
    every singular value towards ~1 without an SVD (Jordan et al. 2024). In bf16 as in the paper where bf16
    matmuls are fast, else in fp32; `work_dtype` overrides that choice."""
    a, b, c = NS_COEFFICIENTS
    if work_dtype is None:
        work_dtype = torch.bfloat16 if _fast_bf16(grad) else torch.float32
    x = grad.to(work_dtype)
    transposed = grad.size(-2) > grad.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # the Frobenius norm bounds the spectral norm
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.mT
    return x.to(grad.dtype)


def _newton_schulz_batches(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Muon's parameters in lists that share one Newton-Schulz call: in bf16, matrices of one shape (up to
    NS_BATCH_ELEMENTS), the same numbers with far fewer small ops; in fp32 on CPU batching is slower
    (bench/RESULTS.md, "CPU kernel choices"), so each matrix goes alone."""
    if not params or not _fast_bf16(params[0]):
        return [[p] for p in params]
    batches: list[list[torch.Tensor]] = []
    open_batch: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        key = (p.shape, p.dtype, p.device)
        current = open_batch.get(key)
        if current is None or (len(current) + 1) * p.numel() > max(NS_BATCH_ELEMENTS, p.numel()):
            current = open_batch[key] = []
            batches.append(current)
        current.append(p)
    return batches


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) for groups with `use_muon=True`, AdamW for the others, in one optimizer.

    Muon: m <- momentum * m + (1 - momentum) * g (an EMA; the orthogonalisation removes its scale);
    update = NS(g + momentum * (m - g)) with Nesterov, else NS(m); p <- p * (1 - lr * wd) - lr * s * update,
    s = sqrt(max(1, rows / cols)) so tall matrices get the same per-entry RMS step as wide ones. For
    [..., rows, cols] parameters (stacked experts) every matrix is orthogonalised on its own.
    AdamW groups need `betas` and `eps`; they keep `exp_avg`, `exp_avg_sq` and `step` (an int) per parameter."""

    def __init__(self, params: Iterable, lr: float = 0.02, weight_decay: float = 0.0,
                 momentum: float = MUON_MOMENTUM, nesterov: bool = True, ns_steps: int = NS_STEPS,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, betas=betas, eps=eps, use_muon=True))
        for group in self.param_groups:
            if group["use_muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError(f"Muon group {group.get('name', '?')!r} holds a 1-D parameter; Muon needs "
                                 "matrices -- put 1-D parameters in a group with use_muon=False")

    @torch.no_grad()
    def step(self, closure=None):
        loss = _call_closure(closure)
        for group in self.param_groups:
            (self._muon_step if group["use_muon"] else self._adamw_step)(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        params = [p for p in group["params"] if p.grad is not None]
        for batch in _newton_schulz_batches(params):
            directions = []
            for p in batch:
                buf = _state(self.state[p], p, "momentum_buffer").lerp_(p.grad, 1 - momentum)
                directions.append(p.grad.lerp(buf, momentum) if group["nesterov"] else buf)
            if len(directions) == 1:  # no stacked copy (a stacked-experts tensor can be large)
                updates = [newton_schulz(directions[0], group["ns_steps"])]
            else:
                updates = newton_schulz(torch.stack(directions), group["ns_steps"]).unbind(0)
            scale = math.sqrt(max(1.0, batch[0].size(-2) / batch[0].size(-1)))
            if wd:
                torch._foreach_mul_(batch, 1 - lr * wd)
            torch._foreach_add_(batch, updates, alpha=-lr * scale)

    def _adamw_step(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            state["step"] = state.get("step", 0) + 1  # a Python int: a device tensor would sync the GPU each step
            exp_avg = _state(state, p, "exp_avg").lerp_(p.grad, 1 - beta1)
            exp_avg_sq = _state(state, p, "exp_avg_sq").mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            # Kingma & Ba 2015 bias correction, folded into the step size and the denominator.
            bias_correction1, bias_correction2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
            denom = (exp_avg_sq / bias_correction2).sqrt_().add_(eps)
            if wd:
                p.mul_(1 - lr * wd)
            p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0 = the first step); a pure function.

    Warmup: (step + 1) / warmup_steps, so step 0 already moves. Then, with m = min_lr_ratio and T = max_steps:
      cosine:   m + (1 - m) * (1 + cos(pi * t)) / 2, t from 0 after warmup to 1 at T (Loshchilov & Hutter 2017)
      wsd:      1, then linear to m over the last decay_fraction * T steps (MiniCPM, Hu et al. 2024, 2404.06395)
      constant: 1
      cyclic:   cosine cycles of cycle_steps steps, 1 -> m -> 1: smooth like Smith 2017's triangular cycles,
                without SGDR's jump from m back to 1 (an LR jump is a classic trigger of loss spikes)"""
    warmup, floor = cfg.warmup_steps, cfg.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
        progress = min(1.0, max(0, step - (cfg.max_steps - decay_steps)) / decay_steps)
        return 1.0 - (1 - floor) * progress
    if cfg.schedule == "cyclic":
        phase = ((step - warmup) % cfg.cycle_steps) / cfg.cycle_steps
        return floor + (1 - floor) * 0.5 * (1 + math.cos(2 * math.pi * phase))
    raise ValueError(f"schedule={cfg.schedule!r}: unknown; choose 'cosine', 'wsd', 'constant' or 'cyclic'")


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, tensor by tensor (integer buffers are copied)."""
    for ema_t, t in zip(ema.state_dict().values(), model.state_dict().values()):
        if ema_t.dtype.is_floating_point:
            ema_t.lerp_(t, 1 - decay)
        else:
            ema_t.copy_(t)
