"""Data parallelism on torch.distributed: the process group, DDP / FSDP2 wrapping, and every reduction that
makes all ranks take the same decisions. Launch: `torchrun --nproc_per_node=N -m nanoseek train --train.dist
ddp|fsdp ...`; without torchrun the run is one process (mode "none", world size 1) and every method a no-op.

Checkpoints are full state written by rank 0, the optimizer's keyed by parameter index as in one process's
`optimizer.state_dict()`: any checkpoint resumes under any mode and world size (the data cursor counts windows,
so it re-strides over the new ranks). Fine for the 1M-1B models nanoseek trains; beyond, sharded DCP checkpoints."""

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.model.moe import MoE


def launched_by_torchrun() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) in a plain process."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1"))


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of an FSDP2 DTensor, else the tensor itself (a view,
    so in-place changes reach the parameter or gradient it came from)."""
    return t.to_local() if is_dtensor(t) else t


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside torch.compile and DDP wrappers (an objective that reads `model.layers` needs it: the
    trainer hands it the wrapped module, and DDP forwards no attribute of the module it holds)."""
    modules = model.__dict__.get("_modules", {})
    inner = modules.get("_orig_mod") or modules.get("module")
    return model if inner is None else unwrap(inner)


class Distributed:
    """This rank's place in the process group (mode "none", "ddp" or "fsdp") and the collectives the trainer calls:
    the guard's numbers (`reduce_step`), MoE expert loads (`sum_`), QK-clip's max logits (`max_`), fp16 found-inf
    flags (`sync_scaler`) and eval losses (`mean_`) must agree on every rank. The reductions are no-ops at world
    size 1 (mode "none", or a group of one)."""

    def __init__(self, mode: str, rank: int, world_size: int, device: torch.device, owns_group: bool = False,
                 note: str = ""):
        self.mode, self.rank, self.world_size, self.is_main = mode, rank, world_size, rank == 0  # rank 0 saves
        self.device, self.owns_group, self.note = device, owns_group, note  # note: one console line, e.g. why DDP
        self.cpu_group = self.mesh = None
        if mode != "none" and dist.get_backend() != "gloo":
            # Host flags over gloo: an NCCL collective on them would first wait for the GPU queue.
            self.cpu_group = dist.new_group(backend="gloo")

    @classmethod
    def setup(cls, mode: str, device: torch.device) -> "Distributed":
        """Join (or start) the process group for `mode` on `device` ("cuda" becomes cuda:LOCAL_RANK). Several
        processes with mode "none" use DDP (N runs on one run directory would overwrite one another); DDP or
        FSDP without torchrun is a process group of one (to check that mode on one device)."""
        _, local_rank, world = launched_by_torchrun()
        note = ""
        if world > 1 and mode == "none":
            mode, note = "ddp", f"{world} processes and train.dist='none': using DDP (--train.dist fsdp shards instead)"
        if mode == "none":
            return cls("none", 0, 1, device)
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                                 "launch at most that many processes per node (--nproc_per_node)")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            backend = "nccl" if device.type == "cuda" else "gloo"
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            if "MASTER_ADDR" not in os.environ and world == 1:  # a group of one needs no rendezvous
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
            else:
                dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10), **kwargs)
        return cls(mode, dist.get_rank(), dist.get_world_size(), device, owns_group=owns, note=note)

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.cpu_group)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. writes prepared data); the others run it once that is done."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def close(self, wait: bool = True) -> None:
        """Leave the process group if this run started it, and go on as this rank alone: no collectives, but
        still rank 0 or not for printing. wait: every rank reaches here together, so meet at a barrier first;
        False on an error path, where the other ranks may never arrive."""
        if self.active and self.owns_group and dist.is_initialized():
            if wait:
                self.barrier()
            dist.destroy_process_group()
        self.mode, self.rank, self.world_size, self.owns_group, self.cpu_group = "none", 0, 1, False, None

    def wrap(self, model: nn.Module, precision: str = "fp32") -> nn.Module:
        """The module the forward pass goes through: `model` itself, DDP(model), or `model` sharded in place.

        DDP syncs buffers once, not before every forward: MoE expert loads and max logits stay per rank until
        our own reductions combine them. FSDP2 shards each Block and MTP module (the root: embedding, norm,
        head); bf16 gathers bf16 parameters and reduces in fp32, but MoE routers stay fp32 (DeepSeek-V3)."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                       forward_sync_buffers=False, gradient_as_bucket_view=True)
        if self.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            self.mesh = init_device_mesh(self.device.type, (self.world_size,))
            param_dtype = torch.bfloat16 if precision == "bf16" else None
            policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
            router_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
            for block in [*model.layers, *getattr(model, "mtp", [])]:
                for module in block.modules():
                    if isinstance(module, MoE) and param_dtype is not None:
                        fully_shard(module.gate, mesh=self.mesh, mp_policy=router_policy)
                fully_shard(block, mesh=self.mesh, mp_policy=policy)
            fully_shard(model, mesh=self.mesh, mp_policy=policy)
        return model

    def grad_sync(self, forward_model: nn.Module, enabled: bool):
        """Context for one micro-batch's backward: gradients are synchronised only on the last one."""
        module = getattr(forward_model, "_orig_mod", forward_model)  # under torch.compile
        if self.mode == "ddp" and not enabled:
            return module.no_sync()
        if self.mode == "fsdp":
            module.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def all_ok(self, ok: bool) -> bool:
        """True only if `ok` holds on every rank (a host-side flag; no GPU sync)."""
        if self.world_size == 1:
            return ok
        flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return int(flag) == 0

    def reduce_step(self, components: list[torch.Tensor],
                    grad_norm: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Global means of the loss components and the global grad norm, from this rank's (DDP: the whole
        gradient; FSDP: its shards), in one all-reduce. A SUM carries a NaN on any rank (one put into a gradient
        after backward, or into a shard) to every rank's guard; a MAX would not (NaN comparisons are unordered)."""
        if self.world_size == 1:
            return components, grad_norm
        # DDP ranks hold the same gradients (barring a rank-local fault): average their squared norms.
        # FSDP shards partition the gradient: add them up.
        norm_weight = 1.0 if self.mode == "fsdp" else 1.0 / self.world_size
        packed = torch.stack([c.float() / self.world_size for c in components]
                             + [grad_norm.float().square() * norm_weight])
        dist.all_reduce(packed)
        return list(packed[:-1].unbind()), packed[-1].sqrt()

    def sum_(self, tensor: torch.Tensor) -> None:
        if self.world_size > 1:
            dist.all_reduce(tensor)

    def max_(self, tensor: torch.Tensor) -> None:
        """In place, over finite values (QK-clip's max logits)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def sync_scaler(self, scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
        """After `scaler.unscale_`: make the found-inf flags global, so an overflow on one rank backs the
        scale off on all of them (otherwise the ranks' loss scales, and then their weights, drift apart)."""
        if self.world_size == 1 or not scaler.is_enabled():
            return
        state = scaler._per_optimizer_states[id(optimizer)]  # torch keeps no public handle on these flags
        for found_inf in state["found_inf_per_device"].values():
            dist.all_reduce(found_inf)

    def gather_objects(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def full_model_state(self, model: nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
        """The unsharded state dict. FSDP (a collective): gathered to CPU on rank 0 and empty elsewhere,
        or with `everywhere` the whole of it on every rank, on the device."""
        if self.mode != "fsdp":
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load an unsharded state dict (every rank passes the whole of it)."""
        if self.mode != "fsdp":
            model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def full_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """`optimizer.state_dict()` as one process would have it. FSDP (a collective; full on rank 0): keyed by
        parameter name, renumbered in param-group order as `optimizer.state_dict()` numbers parameters."""
        if self.mode != "fsdp" or not optimizer.state:
            # An optimizer that has not stepped yet (or was rolled back to before its first step) holds no
            # tensors to gather; and get_optimizer_state_dict would "initialise" it with a zero-LR step,
            # which advances Adam's step counter and so changes every later update.
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        named = get_optimizer_state_dict(model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return {}
        index = {name: i for i, name in enumerate(n for group in named["param_groups"] for n in group["params"])}
        groups = [{**group, "params": [index[name] for name in group["params"]]} for group in named["param_groups"]]
        state = {index[name]: named["state"][name] for name in index if name in named["state"]}
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a state saved by `full_optimizer_state` (any mode, any world size)."""
        if self.mode != "fsdp" or not state["state"]:  # nothing to shard (see full_optimizer_state)
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        names = {id(p): name for name, p in model.named_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        saved_count = sum(len(g["params"]) for g in state["param_groups"])
        if saved_count != len(params):
            raise ValueError(f"the checkpoint's optimizer holds {saved_count} parameters but this model trains "
                             f"{len(params)}; resume with the same model and optimizer settings")
        named_groups = [{**saved, "params": [names[id(p)] for p in group["params"]]}
                        for group, saved in zip(optimizer.param_groups, state["param_groups"])]
        named_state = {names[id(params[i])]: s for i, s in state["state"].items()}
        set_optimizer_state_dict(model, optimizer, {"state": named_state, "param_groups": named_groups},
                                 options=StateDictOptions(full_state_dict=True))
