"""Training objectives: `objective(model, x, y) -> ModelOutput`, what the Trainer minimises.

x [B, T] token ids, y [B, T + lookahead - 1] next-token (and MTP) targets; the returned `losses` are logged and
`losses["ce"]` (else the total) is the eval metric. `next_token_objective` is the default; `distill_objective`
(`nanoseek heal`) distils logits end to end after an MLA conversion (X-EcoMLA, arXiv 2503.11132), and
`DistillationObjective` (`nanoseek npt`) trains NPT adapters to match the frozen base's hidden state per layer."""

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.npt import NPTBlock
from nanoseek.model.transformer import ModelOutput, _cross_entropy
from nanoseek.train.distributed import unwrap

NMSE_FLOOR = 1e-12  # a teacher state of exactly zero norm (never seen in practice) must not divide by 0

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], ModelOutput]


def next_token_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ModelOutput:
    return model(x, y)


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at `temperature`, mean over tokens, times T^2
    (Hinton et al. 2015, so the gradient scale does not depend on T), in fp32. logits [B, T, vocab] -> scalar."""
    log_s = F.log_softmax(student_logits.float() / temperature, -1).flatten(0, -2)
    log_t = F.log_softmax(teacher_logits.float() / temperature, -1).flatten(0, -2)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature ** 2


def normalised_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """student, teacher [B, T, dim] -> scalar sum((s - t)^2) / sum(t^2) over the batch, in fp32: scale-invariant,
    where a plain MSE grows with the hidden size and norm and gives a large model huge first gradients."""
    s, t = student.float(), teacher.float()
    return (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(NMSE_FLOOR)


@contextlib.contextmanager
def outputs_of(modules: dict) -> Iterator[dict]:
    """{key: module} -> {key: that module's forward output}, filled while the model runs inside the block."""
    seen: dict = {}
    with contextlib.ExitStack() as hooks:
        for key, module in modules.items():
            hooks.enter_context(module.register_forward_hook(lambda m, args, out, key=key: seen.__setitem__(key, out)))
        yield seen


def student_ce(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The student's next-token loss, logged beside a distillation loss: logits [B, T, V] against y[:, :T]."""
    return _cross_entropy(logits, y[:, :x.shape[1]])


def distill_objective(teacher: nn.Module, temperature: float = 1.0, hidden_weight: float = 0.0,
                      ce_weight: float = 0.0) -> Objective:
    """KL + hidden_weight * mean_l nmse_l + ce_weight * CE; logs kl, hidden (when on) and student_ce, and the
    total is the eval metric. The teacher runs without gradients on x's device."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    teacher.requires_grad_(False).eval()

    def run(model: nn.Module, x: torch.Tensor) -> tuple[ModelOutput, list[torch.Tensor]]:
        blocks = dict(enumerate(unwrap(model).layers)) if hidden_weight else {}  # inside torch.compile / DDP
        with outputs_of(blocks) as hidden:
            out = model(x)
        return out, [hidden[i] for i in sorted(hidden)]

    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ModelOutput:
        if next(teacher.parameters()).device != x.device:
            teacher.to(x.device)
        with torch.no_grad():
            teacher_out, teacher_hidden = run(teacher, x)
        out, hidden = run(model, x)
        kl = kl_to_teacher(out.logits, teacher_out.logits, temperature)
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(ce_weight)):  # only logged when its weight is 0
            ce = student_ce(out.logits, x, y)
        losses = {"kl": kl, "student_ce": ce.detach()}
        total = kl
        if hidden_weight:
            losses["hidden"] = torch.stack([normalised_mse(h, t) for h, t in zip(hidden, teacher_hidden)]).mean()
            total = total + hidden_weight * losses["hidden"]
        if ce_weight:
            total = total + ce_weight * ce
        losses.update(out.losses)  # the model's own MoE aux / z losses, when the config turns them on
        return ModelOutput(out.logits, sum(out.losses.values(), total), losses)

    return objective


class DistillationObjective:
    """loss = mean_l nmse_l + reg_weight * reg + kl_weight * kl, where reg = mean_l (mean(shift^2) +
    mean(scale_logits^2)) / 2 of the adapters' raw outputs, per element so its weight does not depend on the MLP
    width. At init nmse is the relative size of what the conversion removed (the attention residual), O(1)."""

    def __init__(self, teacher: Callable, layer_ids: tuple[int, ...], reg_weight: float = 0.01, kl_weight: float = 0.0):
        if reg_weight < 0 or kl_weight < 0:
            raise ValueError(f"reg_weight={reg_weight}, kl_weight={kl_weight}: weights must be >= 0")
        self.teacher, self.layer_ids = teacher, tuple(layer_ids)
        self.reg_weight, self.kl_weight = reg_weight, kl_weight

    def __call__(self, student: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> ModelOutput:
        target_hidden, target_logits = self.teacher(x, self.layer_ids, with_logits=self.kl_weight > 0)
        blocks = {i: unwrap(student).layers[i] for i in self.layer_ids}  # the trainer passes the DDP / compile wrapper
        for i, block in blocks.items():
            if not isinstance(block, NPTBlock):
                raise ValueError(f"layer {i} of the student is not an NPT block; convert it with convert_to_npt")
        with outputs_of(blocks) as hidden, outputs_of({i: b.adapter for i, b in blocks.items()}) as adapter_out:
            out = student(x)
        nmse = torch.stack([normalised_mse(hidden[i], target_hidden[i]) for i in self.layer_ids]).mean()
        reg = torch.stack([_adapter_reg(*adapter_out[i]) for i in self.layer_ids]).mean()
        losses = {"nmse": nmse, "reg": reg}
        total = nmse + self.reg_weight * reg
        if self.kl_weight > 0:
            losses["kl"] = kl_to_teacher(out.logits, target_logits)
            total = total + self.kl_weight * losses["kl"]
        with torch.no_grad():
            losses["student_ce"] = student_ce(out.logits, x, y)
        return ModelOutput(out.logits, total, losses)


def _adapter_reg(shift: torch.Tensor, scale_logits: torch.Tensor | None) -> torch.Tensor:
    reg = shift.float().pow(2).mean()
    return reg if scale_logits is None else (reg + scale_logits.float().pow(2).mean()) / 2
