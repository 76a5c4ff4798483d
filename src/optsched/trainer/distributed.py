"""Process-group set-up for ``torchrun``: device choice, DDP wrapping, and the few collectives we use.

Under ``torchrun --nproc_per_node=N`` the environment carries ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``;
:func:`init_distributed` starts the default process group from it (NCCL when the process drives a CUDA
device, gloo on CPU). Without those variables everything here is a no-op for a single process.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from optsched.params.classify import is_transformers_model, unwrap_compiled

logger = logging.getLogger(__name__)

__all__ = [
    "DistributedContext",
    "all_reduce_sum",
    "barrier",
    "ddp_kwargs",
    "empty_device_cache",
    "init_distributed",
    "no_sync",
    "resolve_device",
    "unwrap_model",
    "wrap_model",
]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size``; ``local_rank`` picks its CUDA device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer; torchrun sets it.") from None


def resolve_device(use_cpu: bool, local_rank: int = 0) -> torch.device:
    """``cuda:<local_rank>`` when CUDA is available and ``use_cpu`` is False, else ``cpu``."""
    if not use_cpu and torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def init_distributed(
    use_cpu: bool = False, env: Mapping[str, str] | None = None, *, backend: str | None = None,
    timeout_s: int | None = None,
) -> DistributedContext:
    """Read torchrun's variables and start the process group when ``WORLD_SIZE > 1``.

    A process group already started by the caller is reused as is. The backend is ``backend``
    (``ddp_backend``) when given, else NCCL for CUDA devices and gloo otherwise; ``timeout_s``
    (``ddp_timeout``) bounds each collective's wait (torch's default, 30 minutes for gloo and 10 for NCCL,
    when None).

    Raises:
        ValueError: ``backend`` is not one this torch build has (naming ``ddp_backend``).
    """
    env = os.environ if env is None else env
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(
            rank=dist.get_rank(), local_rank=_env_int(env, "LOCAL_RANK", 0), world_size=dist.get_world_size()
        )
    world_size = _env_int(env, "WORLD_SIZE", 1)
    ctx = DistributedContext(
        rank=_env_int(env, "RANK", 0), local_rank=_env_int(env, "LOCAL_RANK", 0), world_size=world_size
    )
    if world_size <= 1:
        return ctx
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world_size} but this torch build has no torch.distributed support.")
    device = resolve_device(use_cpu, ctx.local_rank)
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    elif not dist.is_backend_available(backend):
        raise ValueError(
            f"ddp_backend={backend!r} is not available in this torch build; accepted: "
            f"{', '.join(b for b in ('gloo', 'nccl', 'mpi', 'xccl') if dist.is_backend_available(b))}, or None "
            "(NCCL on CUDA devices, gloo otherwise)."
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, rank=ctx.rank, world_size=world_size, timeout=timeout)
    logger.info("Started process group: backend=%s rank=%d world_size=%d", backend, ctx.rank, world_size)
    return ctx


def ddp_kwargs(model: torch.nn.Module, args: Any = None) -> dict[str, Any]:
    """The keyword arguments of ``DistributedDataParallel`` that ``args`` sets, by transformers' rules.

    ``find_unused_parameters`` is ``args.ddp_find_unused_parameters`` when set, else transformers'
    default: True, except for a transformers model (``PreTrainedModel``) with gradient checkpointing on
    (a module with ``gradient_checkpointing`` true), where finding unused parameters breaks the
    re-computed backward. True costs a walk of the autograd graph per step; it lets a model with a
    trainable parameter that a step does not use train, where DDP would stop at the second step.
    ``broadcast_buffers``, ``bucket_cap_mb`` and ``static_graph`` are passed only when set (not None).
    ``args`` without these fields (or None) gets the defaults.
    """
    find_unused = getattr(args, "ddp_find_unused_parameters", None)
    if find_unused is None:
        checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
        find_unused = not (is_transformers_model(model) and checkpointing)
    kwargs: dict[str, Any] = {"find_unused_parameters": bool(find_unused)}
    for field, key in (("ddp_broadcast_buffers", "broadcast_buffers"), ("ddp_bucket_cap_mb", "bucket_cap_mb"),
                       ("ddp_static_graph", "static_graph")):
        value = getattr(args, field, None)
        if value is not None:
            kwargs[key] = value
    return kwargs


def wrap_model(
    model: torch.nn.Module, ctx: DistributedContext, device: torch.device, args: Any = None
) -> torch.nn.Module:
    """``DistributedDataParallel(model, **ddp_kwargs(model, args))`` under more than one process
    (gradients averaged), else ``model``."""
    if not ctx.enabled:
        return model
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs(model, args))


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP and ``torch.compile`` wrappers, in either order (``torch_compile`` under DDP
    trains ``torch.compile(DDP(model))``), or the model itself."""
    while True:
        inner = unwrap_compiled(model)
        if isinstance(inner, torch.nn.parallel.DistributedDataParallel):
            inner = inner.module
        if inner is model:
            return model
        model = inner


def no_sync(model: torch.nn.Module, skip_sync: bool) -> Any:
    """DDP's ``no_sync()`` while accumulating (no all-reduce until the last micro-batch), else a no-op.
    A compiled DDP (``torch.compile(DDP(model))``) is found inside its wrapper, as accelerate finds it."""
    ddp = unwrap_compiled(model)
    if skip_sync and isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        return ddp.no_sync()
    return nullcontext()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Sum ``tensor`` over all processes (a copy; the input is left alone). Identity for one process."""
    if not ctx.enabled:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def empty_device_cache(device: torch.device) -> None:
    """Return the caching allocator's free blocks of ``device``'s kind to the driver (``torch_empty_cache_steps``;
    transformers' ``clear_device_cache``): ``torch.cuda.empty_cache()`` and its counterparts; nothing on the CPU,
    which has no such cache."""
    if device.type == "cpu":
        return
    empty_cache = getattr(getattr(torch, device.type, None), "empty_cache", None)
    if callable(empty_cache):
        empty_cache()


def barrier(ctx: DistributedContext) -> None:
    """Wait for every process (no-op for one process)."""
    if ctx.enabled:
        dist.barrier()
