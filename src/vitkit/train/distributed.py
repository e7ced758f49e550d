"""Processes under torchrun: the group, collectives, per-rank random streams, and full
(unsharded) model and optimiser states for checkpoints, whatever the process count."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import restore_rng, rng_state
from ..model import VisionTransformer
from .config import TrainConfig


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_hint: str | None) -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (also across machines with --nnodes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device_hint is None or device_hint.startswith("cuda"))
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)


def device_for(config: TrainConfig, dist: Dist) -> torch.device:
    if config.device:
        from ..infer import resolve_device

        device = resolve_device(config.device)
        if device.type == "cuda" and dist.world_size > 1:
            device = torch.device("cuda", dist.local_rank)
        return device
    return torch.device("cuda", dist.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def all_mean(values: Tensor, dist: Dist) -> Tensor:
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.all_reduce(values)
        values = values / dist.world_size
    return values


def all_sum(values: Tensor, dist: Dist) -> Tensor:
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.all_reduce(values)
    return values


def barrier(dist: Dist) -> None:
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.barrier()


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The global RNG's seed for `rank` (> 0) of a run, or for a rank that resumes at `step`
    without a saved stream of its own."""
    import numpy as np

    words = np.random.SeedSequence([seed % (1 << 64), rank, step]).generate_state(2, np.uint32)
    return int(words[0]) << 32 | int(words[1])


def gathered_rng(device: torch.device, dist: Dist) -> list[dict[str, Any]] | None:
    """Every rank's RNG state, indexed by rank, on rank 0 (None on the others)."""
    own = rng_state(device)
    if dist.world_size == 1:
        return [own]
    import torch.distributed as tdist

    # One tensor all_gather of the states' bytes (the same size on every rank), not the
    # pickling gather_object: with that, gloo sometimes aborted a process at exit.
    parts = [own["torch"]] + ([own["cuda"]] if "cuda" in own else [])
    flat = torch.cat(parts).to(device)
    gathered = [torch.empty_like(flat) for _ in range(dist.world_size)]
    tdist.all_gather(gathered, flat)
    if not dist.main:
        return None
    sizes = [p.numel() for p in parts]
    states = []
    for rank_bytes in gathered:
        split = [part.clone() for part in rank_bytes.cpu().split(sizes)]  # own storage each, as saved
        states.append({"torch": split[0], **({"cuda": split[1]} if len(split) > 1 else {})})
    return states


def resume_rng(state: dict[str, Any], *, seed: int, rank: int, step: int, device: torch.device) -> None:
    """Continue this rank's own stream; a rank the checkpoint has none for (a checkpoint older
    than per-rank streams, or a run resumed on more processes) starts a fresh one keyed by
    (seed, rank, step): taking rank 0's would give it rank 0's masks."""
    saved = state.get("rng_ranks") or [state["rng"]]
    if rank < len(saved):
        restore_rng(saved[rank], device)
    else:
        torch.manual_seed(rank_seed(seed, rank, step))


def _state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gathered_model(raw: VisionTransformer, wrapped: nn.Module, dist: Dist) -> VisionTransformer:
    """A plain model holding full weights, for saving: under FSDP the shards are gathered."""
    if dist.world_size == 1 or isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return raw
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(wrapped, options=_state_options())
    if not dist.main:
        return raw
    copy = VisionTransformer(raw.config)
    copy.load_state_dict({k.removeprefix("model."): v for k, v in full.items()})
    copy.class_names, copy.preprocessing = raw.class_names, raw.preprocessing
    return copy


def optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer, dist: Dist) -> dict[str, Any]:
    """The optimiser's state keyed by parameter name, gathered whole, so any process count resumes it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    module = wrapped.module if isinstance(wrapped, nn.parallel.DistributedDataParallel) else wrapped
    return get_optimizer_state_dict(module, optimizer, options=_state_options())


def restore_optimizer(wrapped: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                       dist: Dist) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    module = wrapped.module if isinstance(wrapped, nn.parallel.DistributedDataParallel) else wrapped
    set_optimizer_state_dict(module, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
