"""Typed configs of the evaluation stages, one per stage, each with the protocol it follows.

Defaults are the papers' protocols shrunk to what two CPU cores finish in minutes on the embedded
digits data; every bound is checked before Ray starts (`methods.config.build`).
"""
from __future__ import annotations

from dataclasses import dataclass

from methods.config import ConfigError, param


@dataclass
class KNNConfig:
    # Weighted kNN of Wu et al., 2018, arXiv:1805.01978: k = 200, temperature 0.07.
    k: list[int] = param([20, 200], help="neighbour counts; top1 is reported for the first")
    temperature: float = param(0.07, gt=0)

    def validate(self, prefix: str) -> None:
        if not self.k or min(self.k) < 1:
            raise ConfigError(f"{prefix}.k: {self.k} must be a non-empty list of integers >= 1")


@dataclass
class LinearConfig:
    # Linear probe on frozen features, lr and weight decay chosen on held-out training features
    # (Kolesnikov et al., 2019, arXiv:1901.09005). k-fold rather than one split: on digits one
    # 10% split is 126 images, too few to rank the grid (one set of features scored 0.928 or 0.948
    # depending on the split's seed); five folds score every training image once.
    epochs: int = param(100, ge=1, help="passes over the frozen training features")
    lrs: list[float] = param([0.1, 0.01, 0.001], help="lr grid (AdamW, cosine)")
    weight_decays: list[float] = param([0.0, 0.05, 0.5], help="decoupled weight decay grid")
    batch_size: int = param(256, ge=1)
    folds: int = param(5, ge=1, help="stratified k-fold cross-validation picks (lr, weight decay); "
                                     "1: one validation split of val_fraction")
    val_fraction: float = param(0.1, gt=0, lt=1, help="validation split when folds is 1")

    def validate(self, prefix: str) -> None:
        if not self.lrs or min(self.lrs) <= 0:
            raise ConfigError(f"{prefix}.lrs: {self.lrs} must be a non-empty list of values > 0")
        if not self.weight_decays or min(self.weight_decays) < 0:
            raise ConfigError(f"{prefix}.weight_decays: {self.weight_decays} must be a non-empty "
                              f"list of values >= 0")


@dataclass
class FinetuneConfig:
    # The whole encoder plus a linear head, a small lr for the encoder (SimCLR, Chen et al., 2020,
    # arXiv:2002.05709, appendix B.5; SimCLRv2, arXiv:2006.10029). Few epochs: CPU-sized.
    epochs: int = param(3, ge=1, help="passes over the labeled training images")
    min_steps: int = param(30, ge=1, help="at least this many optimiser steps (small label sets "
                                          "need more passes, as the 1%/10% protocol)")
    lr: float = param(1e-3, gt=0, help="AdamW lr of the encoder")
    head_lr: float = param(1e-2, gt=0, help="AdamW lr of the new linear head")
    weight_decay: float = param(1e-4, ge=0)
    batch_size: int = param(64, ge=2)


@dataclass
class LowShotConfig:
    # 1% and 10% of the labels, class-balanced, as the semi-supervised protocol of SimCLR (Chen et
    # al., 2020, arXiv:2002.05709, section 6) and SimCLRv2 (arXiv:2006.10029).
    fractions: list[float] = param([0.01, 0.1], help="labeled fractions of the training split")
    protocols: list[str] = param(["linear", "finetune"], choices=("linear", "finetune"))
    linear_lr: float = param(0.01, gt=0, help="fixed lr of the low-shot linear probe: too few "
                                              "labels to carve a validation split")
    linear_weight_decay: float = param(0.0, ge=0, help="fixed weight decay of that probe")

    def validate(self, prefix: str) -> None:
        if not self.fractions or not all(0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"{prefix}.fractions: {self.fractions} must be values in (0, 1]")
        if not self.protocols:
            raise ConfigError(f"{prefix}.protocols: give at least one of linear, finetune")


@dataclass
class KMeansConfig:
    # k-means with k = number of classes, scored by NMI (Strehl & Ghosh, 2002) and ARI (Hubert &
    # Arabie, 1985), as in DeepCluster (Caron et al., 2018, arXiv:1807.05520).
    n_init: int = param(10, ge=1, help="k-means restarts; the lowest inertia wins")
    l2_normalize: bool = param(True, help="cluster L2-normalised features (cosine geometry)")


@dataclass
class TSNEConfig:
    # t-SNE of van der Maaten & Hinton, JMLR 2008; PCA above `max_points`, where t-SNE gets slow.
    perplexity: float = param(30.0, gt=1)
    max_points: int = param(3000, ge=10, help="above this many test points, plot PCA instead")
    projector_points: int = param(500, ge=0, help="test points in TensorBoard's embedding "
                                                  "projector, with thumbnails (0: none)")


@dataclass
class RobustnessConfig:
    # Corruptions of Hendrycks & Dietterich, 2019, arXiv:1903.12261, at their CIFAR-10-C
    # parameters (severities 1, 3 and 5 of 5 there), blur scaled to the image size.
    corruptions: list[str] = param(["gaussian_noise", "gaussian_blur", "contrast", "jpeg"],
                                   choices=("gaussian_noise", "gaussian_blur", "contrast", "jpeg"))
    severities: list[int] = param([1, 2, 3], help="levels 1..3 (0 is the clean image)")

    def validate(self, prefix: str) -> None:
        if not self.severities or not all(1 <= s <= 3 for s in self.severities):
            raise ConfigError(f"{prefix}.severities: {self.severities} must be levels in 1..3")
        if not self.corruptions:
            raise ConfigError(f"{prefix}.corruptions: give at least one corruption")


@dataclass
class EfficiencyConfig:
    batch_size: int = param(128, ge=1, help="images per timed inference batch")
    batches: int = param(5, ge=1, help="timed batches (after one warm-up batch)")
