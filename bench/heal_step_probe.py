"""One AdamW step on a subset of a converted model's weights: which weights does a heal step hurt?

    python bench/heal_step_probe.py --run W/moe --teacher SMOL --lr 1e-5 --subsets all wkv_b experts others
    python bench/heal_step_probe.py --run W/old-moe --teacher SMOL --lr 1e-5 --fold   # fold an older conversion

Takes three 4 x 256 windows of the run's training data, one AdamW step (betas 0.9/0.95, bf16 autocast) on the
first with only the subset trainable (routers excluded), and prints the change of KL(teacher || student) on
each of the three windows, with the largest gradient norms. Conversions made before the latent norm's gain was
folded into wkv_b (commit b78da90) kept it in kv_norm's weight; --fold folds such a run's gain in memory first,
so the same run gives both sides of the comparison (bench/RESULTS.md).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import tyro

from nanoseek.cli.convert import load_source
from nanoseek.data import load_prepared, read_tokens
from nanoseek.train.loading import load_model
from nanoseek.train.objectives import kl_to_teacher

SUBSETS = {"all": lambda n: True, "wkv_b": lambda n: "wkv_b" in n, "attn": lambda n: ".attn." in n,
           "experts": lambda n: ".ffn." in n, "others": lambda n: "wkv_b" not in n and "kv_norm" not in n}


@dataclass
class Args:
    run: str
    """A converted run directory (`nanoseek convert --to mla-moe`)."""
    teacher: str
    """The model it was converted from."""
    lr: float = 1e-5
    subsets: tuple[str, ...] = ("all", "wkv_b", "experts", "others")
    fold: bool = False
    """Fold kv_norm's weight into wkv_b first (for a run converted before the fold)."""


def main(args: Args) -> None:
    torch.manual_seed(0)
    student0, _ = load_model(args.run)
    if args.fold:
        with torch.no_grad():
            for layer in student0.layers:
                layer.attn.wkv_b.weight.mul_(layer.attn.kv_norm.weight)  # [rows, R] * [R]: exact
                layer.attn.kv_norm.weight.fill_(1.0)
    teacher = load_source(args.teacher, "--teacher")[0].eval()
    ids = torch.from_numpy(read_tokens(load_prepared(f"{args.run}/data").train_shards, 3 * 4 * 256)).view(3, 4, 256)
    with torch.no_grad():
        target = [teacher(batch).logits for batch in ids]

    def kl(model, i: int) -> float:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            return float(kl_to_teacher(model(ids[i]).logits, target[i]))

    base = [kl(student0, i) for i in range(3)]
    print(f"KL before: {[round(b, 3) for b in base]}")
    for name in args.subsets:
        model = copy.deepcopy(student0).train()
        for pname, p in model.named_parameters():
            p.requires_grad_(SUBSETS[name](pname) and "gate.weight" not in pname)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
        with torch.autocast("cpu", torch.bfloat16):
            kl_to_teacher(model(ids[0]).logits, target[0]).backward()
        norms = sorted(((n, float(p.grad.norm())) for n, p in model.named_parameters() if p.grad is not None),
                       key=lambda item: -item[1])[:3]
        optimizer.step()
        model.eval()
        change = [round(kl(model, i) - base[i], 3) for i in range(3)]
        print(f"{name:8s} lr {args.lr:g}: KL change {change}; largest grad norms {[(n, round(v)) for n, v in norms]}")


if __name__ == "__main__":
    main(tyro.cli(Args))
