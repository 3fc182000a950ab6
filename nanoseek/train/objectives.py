"""Teacher-student loss for NPT adapters: the student (base + adapters) must reproduce the teacher's
(frozen base's) hidden state at every converted layer.

    loss = mean_l nmse_l + reg_weight * reg + kl_weight * kl

nmse_l = ||h_s - h_t||^2 / ||h_t||^2 over the whole batch at converted layer l, in fp32. Scale-invariant:
it is the relative squared error whatever the size of the residual stream (a plain MSE grows with the
hidden size and norm, and on a large model its first steps give huge gradients, seed 002). At init it
is the relative size of what the conversion removed (the attention residual), O(1) for any model.

reg = mean_l (mean(shift^2) + mean(scale_logits^2)) / 2: the adapters' raw outputs, per element so the
weight does not depend on the MLP width. kl = KL(teacher || student) of the next-token distributions,
optional (kl_weight > 0). `student_ce` (the student's next-token loss) is logged, never optimised.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from nanoseek.model.transformer import ModelOutput, _cross_entropy
from nanoseek.model.npt import NPTBlock
from nanoseek.train.distributed import unwrap

NMSE_FLOOR = 1e-12  # a teacher state of exactly zero norm (never seen in practice) must not divide by 0


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at `temperature`, mean over tokens, times T^2
    (Hinton et al. 2015, so the gradient scale does not depend on T), in fp32. logits [B, T, vocab] -> scalar."""
    log_s = F.log_softmax(student_logits.float() / temperature, -1).flatten(0, -2)
    log_t = F.log_softmax(teacher_logits.float() / temperature, -1).flatten(0, -2)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature ** 2


def normalised_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """student, teacher [B, T, dim] -> scalar sum((s - t)^2) / sum(t^2), in fp32."""
    s, t = student.float(), teacher.float()
    return (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(NMSE_FLOOR)


class DistillationObjective:
    """`objective(student, x, y) -> ModelOutput` for the Trainer (see the module docstring).

    x [B, T] token ids; y [B, T(+lookahead)] next-token targets (only for the logged student_ce).
    """

    def __init__(self, teacher: Callable, layer_ids: tuple[int, ...], reg_weight: float = 0.01,
                 kl_weight: float = 0.0):
        if reg_weight < 0 or kl_weight < 0:
            raise ValueError(f"reg_weight={reg_weight}, kl_weight={kl_weight}: weights must be >= 0")
        self.teacher, self.layer_ids = teacher, tuple(layer_ids)
        self.reg_weight, self.kl_weight = reg_weight, kl_weight

    def __call__(self, student: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> ModelOutput:
        target_hidden, target_logits = self.teacher(x, self.layer_ids, with_logits=self.kl_weight > 0)
        hidden, adapter_out = {}, {}
        handles = []
        for i in self.layer_ids:
            block = unwrap(student).layers[i]  # the trainer passes the DDP / torch.compile wrapper
            if not isinstance(block, NPTBlock):
                raise ValueError(f"layer {i} of the student is not an NPT block; convert it with convert_to_npt")
            # Forward hooks read each converted block's output and its adapter's raw outputs without
            # changing what the model's forward returns.
            handles.append(block.register_forward_hook(lambda m, a, out, i=i: hidden.__setitem__(i, out)))
            handles.append(block.adapter.register_forward_hook(lambda m, a, out, i=i: adapter_out.__setitem__(i, out)))
        try:
            out = student(x)
        finally:
            for handle in handles:
                handle.remove()

        nmse = torch.stack([normalised_mse(hidden[i], target_hidden[i]) for i in self.layer_ids]).mean()
        reg_parts = []
        for i in self.layer_ids:
            shift, scale_logits = adapter_out[i]
            part = shift.float().pow(2).mean()
            if scale_logits is not None:
                part = (part + scale_logits.float().pow(2).mean()) / 2
            reg_parts.append(part)
        reg = torch.stack(reg_parts).mean()
        losses = {"nmse": nmse, "reg": reg}
        total = nmse + self.reg_weight * reg
        if self.kl_weight > 0:
            losses["kl"] = kl_to_teacher(out.logits, target_logits)
            total = total + self.kl_weight * losses["kl"]
        with torch.no_grad():
            losses["student_ce"] = _cross_entropy(out.logits, y[:, :x.shape[1]])
        return ModelOutput(out.logits, total, losses)
