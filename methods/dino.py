"""DINO — Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin, "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021, arXiv:2104.14294.

Self-distillation without labels: a student (backbone + DINO head) matches the output
distribution of a teacher that is the EMA of the student (momentum 0.996 raised to 1 by a cosine).
Multi-crop: two global crops (scale 0.4-1) go to both networks, N small local crops (scale
0.05-0.4) to the student only. Collapse is avoided by centring the teacher logits with an EMA of
their batch mean (momentum 0.9; the mean is all-reduced over workers) and sharpening them with a
low teacher temperature (warmed up linearly); the student temperature is 0.1.

Features for evaluation come from the teacher backbone by default, as in the paper (section 5.3:
the teacher outperforms the student throughout training); for a ViT they are the CLS token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods import augment
from methods.backbones import BackboneConfig, build_backbone, normalize
from methods.base import SSLMethod
from methods.config import ConfigError, param
from methods.distributed import all_reduce_mean_
from methods.losses import dino_loss, dino_stats
from methods.momentum import cosine_momentum, ema_update_, momentum_copy, warmup_value
from methods.registry import register
from methods.views import AugmentConfig, asymmetric, augment_view, check_probabilities

# Teacher entropy / log K of a uniform teacher. A healthy run on the digits config peaked at 0.90;
# a collapsed one sat at log K from its 30th step.
UNIFORM_TEACHER = 0.99


@dataclass
class DINOConfig:
    # Caron et al. 2021, section 3 and appendix (main_dino.py defaults for ViT-S/16).
    out_dim: int = param(65536, ge=1, tunable=True, help="K, width of the head's output")
    head_hidden_dim: int = param(2048, ge=1)
    bottleneck_dim: int = param(256, ge=1)
    head_layers: int = param(3, ge=1)
    head_batch_norm: bool = param(False, help="BatchNorm after the hidden layers of the head "
                                              "(DINO's use_bn_in_head; useful with ResNets)")
    norm_last_layer: bool = param(True, help="weight-normalised last layer, norm fixed at 1")
    student_temp: float = param(0.1, gt=0)
    teacher_temp: float = param(0.07, gt=0, tunable=True, help="teacher temperature after warm-up")
    warmup_teacher_temp: float = param(0.04, gt=0, help="teacher temperature at step 0")
    warmup_teacher_temp_frac: float = param(0.3, ge=0, le=1, help="warm-up, fraction of training "
                                                                   "(paper: 30 of 100 epochs)")
    center_momentum: float = param(0.9, ge=0, lt=1)
    base_momentum: float = param(0.996, ge=0, le=1, tunable=True, help="teacher EMA; cosine to 1")
    freeze_last_layer_frac: float = param(0.01, ge=0, le=1,
                                          help="no gradient to the last layer for this fraction "
                                               "of training (paper: the first epoch of 100)")
    n_local: int = param(8, ge=0, help="local crops per image")
    local_size: int = param(96, ge=4, help="side of the local crops (global crops: image size)")
    global_scale: tuple[float, float] = param((0.4, 1.0))
    local_scale: tuple[float, float] = param((0.05, 0.4))
    blur_p: tuple[float, float, float] = param((1.0, 0.1, 0.5),
                                               help="blur of global crop 1, global crop 2, locals")
    solarize_p: tuple[float, float, float] = param((0.0, 0.2, 0.0))
    embed_teacher: bool = param(True, help="evaluate the teacher backbone (paper) or the student")
    # DINO's jitter is BYOL's (0.4, 0.4, 0.2, 0.1) with p = 0.8: strength 0.5, saturation 0.2.
    aug: AugmentConfig = param(default_factory=lambda: AugmentConfig(
        jitter_strength=0.5, saturation=0.2, jitter_p=0.8, gray_p=0.2))

    def validate(self, prefix: str) -> None:
        check_probabilities(self, prefix)
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"{prefix}.{name}: [{lo}, {hi}] must satisfy "
                                  f"0 < low <= high <= 1")


class MultiCrop:
    """images uint8 (B, 3, H, W) -> {"global0", "global1"}: (B, 3, S, S) and
    {"local0" .. "local<N-1>"}: (B, 3, s, s), uint8."""

    def __init__(self, augs: tuple[AugmentConfig, AugmentConfig, AugmentConfig],
                 global_scale: tuple[float, float], local_scale: tuple[float, float],
                 n_local: int, local_size: int, image_size: int):
        self.size, self.local_size, self.n_local = image_size, local_size, n_local
        self.global_scale, self.local_scale = global_scale, local_scale
        self.global_augs, self.local_aug = augs[:2], augs[2]

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x = augment.to_float(images)
        out = {f"global{i}": augment_view(x, self.size, aug, generator, scale=self.global_scale)
               for i, aug in enumerate(self.global_augs)}
        out.update({f"local{i}": augment_view(x, self.local_size, self.local_aug, generator,
                                              scale=self.local_scale)
                    for i in range(self.n_local)})
        return out


class DINOHead(nn.Module):
    """MLP (GELU, optionally BN) to a bottleneck, L2 normalisation, then a weight-normalised
    linear layer to K."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int,
                 num_layers: int, norm_last_layer: bool, batch_norm: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(d, hidden_dim)]
            layers += [nn.BatchNorm1d(hidden_dim), nn.GELU()] if batch_norm else [nn.GELU()]
            d = hidden_dim
        layers.append(nn.Linear(d, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        # weight normalisation w = g * v / ||v||, row by row; g fixed at 1 when norm_last_layer
        self.last_v = nn.Parameter(nn.init.trunc_normal_(torch.empty(out_dim, bottleneck_dim),
                                                         std=0.02))
        self.last_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def forward(self, x: torch.Tensor, last_layer_grad: float = 1.0) -> torch.Tensor:
        """features (B, D) -> logits (B, K); the last layer's gradient is scaled by
        `last_layer_grad` (0 freezes it while keeping it in the graph, as DDP needs)."""
        x = F.normalize(self.mlp(x), dim=-1)  # (B, bottleneck)
        weight = self.last_g * F.normalize(self.last_v, dim=1)  # (K, bottleneck)
        if last_layer_grad != 1.0:
            weight = weight.detach() + last_layer_grad * (weight - weight.detach())
        return x @ weight.T  # (B, K)


class DINO(SSLMethod):
    def __init__(self, cfg: DINOConfig, backbone: BackboneConfig, image_size: int):
        super().__init__()
        self.n_local, self.student_temp = cfg.n_local, cfg.student_temp
        self.center_momentum, self.base_momentum = cfg.center_momentum, cfg.base_momentum
        self.teacher_temps = (cfg.warmup_teacher_temp, cfg.teacher_temp,
                              cfg.warmup_teacher_temp_frac)
        self.freeze_last_layer_frac = cfg.freeze_last_layer_frac
        self.embed_teacher = cfg.embed_teacher
        self.backbone, dim = build_backbone(backbone, image_size)
        self.head = DINOHead(dim, cfg.out_dim, cfg.head_hidden_dim, cfg.bottleneck_dim,
                             cfg.head_layers, cfg.norm_last_layer, cfg.head_batch_norm)
        self.teacher_backbone = momentum_copy(self.backbone)
        self.teacher_head = momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        # set by on_step for the next step, so a checkpoint resumes the schedules exactly
        self.register_buffer("teacher_temp", torch.tensor(cfg.warmup_teacher_temp,
                                                         dtype=torch.float64))
        self.register_buffer("last_layer_frozen", torch.tensor(cfg.freeze_last_layer_frac > 0))

    def _student(self, crops: list[torch.Tensor], sizes: int) -> list[torch.Tensor]:
        """V crops x (B, 3, s, s) -> V x (B, K). The backbone takes the crops of each size
        together; the head takes every crop's features in one call, so its BatchNorm (if any)
        normalises over all crops, as the reference's MultiCropWrapper does."""
        groups = [crops[:sizes], crops[sizes:]] if sizes < len(crops) else [crops]
        features = torch.cat([self.backbone(normalize(torch.cat(g))) for g in groups])  # (V B, D)
        grad = 0.0 if bool(self.last_layer_frozen) else 1.0
        return list(self.head(features, grad).chunk(len(crops)))  # V x (B, K)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        global_crops = [batch["global0"], batch["global1"]]
        local_crops = [batch[f"local{i}"] for i in range(self.n_local)]
        student_out = self._student(global_crops + local_crops, sizes=len(global_crops))
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(normalize(torch.cat(global_crops))))
            teacher_out = list(teacher.chunk(2))  # 2 x (B, K)
            # the centre moves in on_step, by this batch's mean teacher output
            self.pending["center"] = teacher.mean(dim=0, keepdim=True)  # (1, K)
        teacher_temp = float(self.teacher_temp)
        loss = dino_loss(student_out, teacher_out, self.center, self.student_temp, teacher_temp)
        metrics = {**dino_stats(teacher_out, self.center, teacher_temp),
                   "teacher_temp": teacher_temp}
        return loss, metrics

    @torch.no_grad()
    def on_step(self, step: int, total_steps: int) -> None:
        m = cosine_momentum(step, total_steps, self.base_momentum)
        ema_update_(self.teacher_backbone, self.backbone, m)
        ema_update_(self.teacher_head, self.head, m)
        batch_center = self.pending.pop("center", None)
        if batch_center is not None:  # c <- m c + (1 - m) * the mean over all workers' batches
            batch_center = all_reduce_mean_(batch_center)
            self.center.mul_(self.center_momentum).add_(batch_center,
                                                        alpha=1.0 - self.center_momentum)
        start, end, warmup_frac = self.teacher_temps
        self.teacher_temp.fill_(warmup_value(step + 1, int(warmup_frac * total_steps), start, end))
        self.last_layer_frozen.fill_(step + 1 < int(self.freeze_last_layer_frac * total_steps))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.teacher_backbone, self.backbone), (self.teacher_head, self.head)]

    def step_buffers(self) -> list[str]:
        return ["center", "teacher_temp"]

    @staticmethod
    def collapse(metrics: dict[str, float]) -> str | None:
        """A uniform teacher (entropy at log K, Caron et al. 2021, section 5.3): its features
        can keep their spread and kNN, so the embedding checks miss it."""
        ratio = metrics.get("teacher_entropy_ratio")
        if ratio is not None and ratio >= UNIFORM_TEACHER:
            return f"the teacher went uniform (entropy {ratio:.3f} of log K)"
        return None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        net = self.teacher_backbone if self.embed_teacher else self.backbone
        return net(normalize(images))  # (B, D)

    def log_images(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = min(16, batch["global0"].shape[0])
        out = {f"views/global{i}": batch[f"global{i}"][:n] for i in range(2)}
        if self.n_local:
            out["views/local0"] = batch["local0"][:n]
        return out


def views(cfg: DINOConfig, image_size: int) -> MultiCrop:
    return MultiCrop(asymmetric(cfg.aug, cfg.blur_p, cfg.solarize_p), cfg.global_scale,
                     cfg.local_scale, cfg.n_local, cfg.local_size, image_size)


register("dino", config=DINOConfig, model=DINO, views=views,
         paper="Caron et al. 2021, arXiv:2104.14294",
         tiny={"method": {"out_dim": 16, "head_hidden_dim": 16, "bottleneck_dim": 8, "n_local": 2,
                          "local_size": 8, "freeze_last_layer_frac": 0.0},
               "backbone": {"name": "vit_tiny", "depth": 1, "patch_size": 4}, "image_size": 16})
