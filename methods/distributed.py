"""The collectives the methods need, in one place, each a no-op at world size 1.

SimCLR draws its negatives from the global batch across workers (Chen et al., 2020,
arXiv:2002.05709, section 2.2), MoCo enqueues every worker's keys and MoCo v3 contrasts against
all workers' keys (He et al., 2019, arXiv:1911.05722; Chen, Xie, He, 2021, arXiv:2104.02057), and
DINO averages its teacher centre over workers (Caron et al., 2021, arXiv:2104.14294).

Every function works without a process group (unit tests, a single laptop process) and returns its
input unchanged there. Gathers assume every worker passes a tensor of the same shape, which holds
because every worker sees the same local batch size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of workers in the default process group; 1 when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This worker's rank in the default process group; 0 when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def _gather(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)  # (W * B, ...)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums the gathered gradient over workers, keeps own slice.

    Every worker r computes its own loss L_r from the gathered tensor, and data-parallel training
    optimises sum_r L_r (DDP then divides by W). Worker r's slice x_r is used by all W losses, so
    d(sum_r' L_r')/dx_r = sum_r' dL_r'/d(gathered)[slice r]: each worker only knows its own term,
    so the incoming gradients are all-reduced (SUM) and each worker keeps the rows of its slice.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.batch = x.shape[0]
        return _gather(x)

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor) -> torch.Tensor:
        grad_gathered = grad_gathered.contiguous().clone()  # (W * B, ...)
        dist.all_reduce(grad_gathered, op=dist.ReduceOp.SUM)
        start = rank() * ctx.batch
        return grad_gathered[start:start + ctx.batch]  # (B, ...)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (B, ...) from all workers along dim 0 in rank order -> (W * B, ...).

    Gradients flow back to each worker's own slice. Every worker must call backward through the
    result, since the backward pass is itself a collective.
    """
    if world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Detached concatenation of x (B, ...) from all workers in rank order -> (W * B, ...)."""
    if world_size() == 1:
        return x.detach()
    return _gather(x.detach())


@torch.no_grad()
def all_reduce_mean_(x: torch.Tensor) -> torch.Tensor:
    """Replace x in place by its mean over workers and return it."""
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x.div_(world_size())
    return x


@torch.no_grad()
def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite x in place with worker `src`'s value and return it."""
    if world_size() > 1:
        dist.broadcast(x, src=src)
    return x
