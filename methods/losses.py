"""The self-supervised losses, as plain functions of tensors; each names its paper.

nt_xent                 SimCLR, Chen, Kornblith, Norouzi, Hinton, 2020, arXiv:2002.05709
info_nce                MoCo, He, Fan, Wu, Xie, Girshick, 2019, arXiv:1911.05722
contrastive_batch_loss  MoCo v3, Chen, Xie, He, 2021, arXiv:2104.02057
dino_loss, dino_stats   DINO, Caron et al., 2021, arXiv:2104.14294
mae_loss, patchify      MAE, He, Chen, Xie, Li, Dollar, Girshick, 2021, arXiv:2111.06377
byol_loss               BYOL, Grill et al., 2020, arXiv:2006.07733

The contrastive losses draw negatives across workers through `methods.distributed`, which is a
no-op at world size 1, so every loss runs in a unit test with no process group.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from methods.distributed import all_gather_no_grad, all_gather_with_grad, rank, world_size


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, *,
            gather: bool = True) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy (Chen et al., 2020, arXiv:2002.05709).

    z1, z2: (N, D) projections of two views of the same N images. Each of the 2N views is an
    anchor; its positive is its partner view and its negatives are all other views. With `gather`
    and a process group of W > 1 workers, the candidates are the global 2NW views (gathered with
    gradient) and the anchors the local 2N, so the mean over workers of this loss equals the loss
    of the global batch on one worker. Returns the mean over anchors.
    """
    n = z1.shape[0]
    z_local = F.normalize(torch.cat([z1, z2]), dim=1)  # (2N, D)
    distributed = gather and world_size() > 1
    z_all = all_gather_with_grad(z_local) if distributed else z_local  # (2NW, D)
    offset = 2 * n * rank() if distributed else 0
    logits = z_local @ z_all.T / temperature  # (2N, 2NW)
    anchor = torch.arange(2 * n, device=z1.device)  # (2N,)
    self_column = offset + anchor  # (2N,)
    positive = offset + (anchor + n) % (2 * n)  # (2N,)
    is_self = torch.zeros_like(logits, dtype=torch.bool)  # (2N, 2NW)
    is_self[anchor, self_column] = True
    logits = logits.masked_fill(is_self, float("-inf"))
    return F.cross_entropy(logits, positive)


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE with a queue of negatives (He et al., 2019, arXiv:1911.05722, Algorithm 1).

    q: (B, D) queries, k: (B, D) keys of the same images, queue: (K, D) keys of earlier batches.
    All are L2-normalised here; k and queue carry no gradient. The positive is at index 0 of the
    (B, 1+K) logits. Returns the mean over B.
    """
    q = F.normalize(q, dim=1)  # (B, D)
    k = F.normalize(k.detach(), dim=1)  # (B, D)
    queue = F.normalize(queue.detach(), dim=1)  # (K, D)
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    l_neg = q @ queue.T  # (B, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # (B, 1+K)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # (B,)
    return F.cross_entropy(logits, labels)


def contrastive_batch_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's contrastive loss against the keys of the batch (Chen, Xie, He, 2021,
    arXiv:2104.02057, Algorithm 1).

    q: (B, D) local queries, k: (B, D) local keys (momentum encoder, no gradient). Keys are
    gathered from all workers, so query i's positive is global key rank*B + i and its negatives
    are the other B*W - 1 keys. Scaled by 2*T as in the paper's code. Returns the mean over B.
    """
    q = F.normalize(q, dim=1)  # (B, D)
    k_all = F.normalize(all_gather_no_grad(k), dim=1)  # (B * W, D)
    logits = q @ k_all.T / temperature  # (B, B * W)
    labels = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]  # (B,)
    return F.cross_entropy(logits, labels) * (2 * temperature)


def _teacher_probs(teacher_out: list[torch.Tensor], center: torch.Tensor,
                   teacher_temp: float) -> list[torch.Tensor]:
    return [F.softmax((t.detach() - center) / teacher_temp, dim=-1) for t in teacher_out]  # (B, K)


def dino_loss(student_out: list[torch.Tensor], teacher_out: list[torch.Tensor],
              center: torch.Tensor, student_temp: float, teacher_temp: float) -> torch.Tensor:
    """DINO's self-distillation cross-entropy (Caron et al., 2021, arXiv:2104.14294, eq. 3).

    student_out: V_s logits (B, K), global views first; teacher_out: V_t logits (B, K) of the
    global views, teacher view i being the same crop as student view i. center: (K,) or (1, K).
    Teacher probabilities softmax((t - center) / teacher_temp) carry no gradient. Cross-entropy
    is summed over K, averaged over B and over all pairs (teacher i, student j) with i != j.
    """
    teacher_probs = _teacher_probs(teacher_out, center, teacher_temp)
    student_logp = [F.log_softmax(s / student_temp, dim=-1) for s in student_out]  # (B, K)
    terms = [-(p_t * logp_s).sum(dim=-1).mean()
             for i, p_t in enumerate(teacher_probs)
             for j, logp_s in enumerate(student_logp) if i != j]
    if not terms:
        raise ValueError("dino_loss needs at least one (teacher i, student j) pair with i != j; "
                         f"got {len(teacher_out)} teacher and {len(student_out)} student views")
    return torch.stack(terms).mean()


@torch.no_grad()
def dino_stats(teacher_out: list[torch.Tensor], center: torch.Tensor,
               teacher_temp: float) -> dict[str, float]:
    """Collapse indicators of DINO's teacher (Caron et al., 2021, arXiv:2104.14294, section 5.3).

    teacher_entropy: mean entropy of the per-sample teacher distribution (0 when sharp; log K
    when uniform); teacher_entropy_ratio: that entropy / log K, in [0, 1] whatever K is.
    teacher_kl_uniform: KL(mean teacher distribution || uniform), near log K when every sample
    lands on one dimension, near 0 when the batch uses all dimensions. Collapse to uniform shows as
    entropy ~ log K with KL ~ 0; collapse to one dimension as both extremes.
    """
    probs = torch.cat(_teacher_probs(teacher_out, center, teacher_temp))  # (V_t * B, K)
    entropy = float(-(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1).mean())  # one sync
    mean_probs = probs.mean(dim=0)  # (K,)
    num_dims = mean_probs.shape[0]
    kl = (mean_probs * torch.log(mean_probs.clamp_min(1e-12) * num_dims)).sum()
    return {"teacher_entropy": entropy, "teacher_entropy_ratio": entropy / math.log(num_dims),
            "teacher_kl_uniform": kl.item()}


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
             norm_pix: bool) -> torch.Tensor:
    """MAE's reconstruction loss on the removed patches (He et al., 2021, arXiv:2111.06377).

    pred, target: (B, L, P) per-patch pixels (see `patchify`); mask: (B, L), 1 = removed. With
    norm_pix the target is normalised per patch by its mean and (unbiased, as in the reference
    code) variance + 1e-6. Mean squared error per patch, averaged over the removed patches; 0
    when no patch is removed.
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)  # (B, L, 1)
        var = target.var(dim=-1, keepdim=True)  # (B, L, 1)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (B, L)
    mask = mask.to(per_patch.dtype)  # (B, L)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """images (B, C, H, W) -> (B, L, patch*patch*C), patches in row-major order, each flattened
    as (row, column, channel) like MAE's reference code (He et al., 2021, arXiv:2111.06377)."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {patch}")
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return x.reshape(b, gh * gw, patch * patch * c)


def unpatchify(x: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """Inverse of `patchify` for square images: (B, L, patch*patch*C) -> (B, C, H, W)."""
    b, num_patches, _ = x.shape
    side = math.isqrt(num_patches)
    if side * side != num_patches or x.shape[2] != patch * patch * channels:
        raise ValueError(f"cannot unpatchify {tuple(x.shape)} with patch {patch} and "
                         f"{channels} channels into a square image")
    x = x.reshape(b, side, side, patch, patch, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
    return x.reshape(b, channels, side * patch, side * patch)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised mean squared error (Grill et al., 2020, arXiv:2006.07733, eq. 2):
    ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z) per image, the target z without gradient.

    p: (B, D) online predictions, z: (B, D) target projections of the other view. Computed in
    float32 whatever the autocast. Returns the mean over B.
    """
    p = F.normalize(p.float(), dim=1)  # (B, D)
    z = F.normalize(z.detach().float(), dim=1)  # (B, D)
    return (2.0 - 2.0 * (p * z).sum(dim=1)).mean()
