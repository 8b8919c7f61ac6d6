"""Each method's defaults are its paper's (the reference named in its config's comments)."""
from __future__ import annotations

import methods
from methods.config import build


def defaults(name: str):
    return build(methods.get(name).config, {}, "method")


def test_contrastive_and_distillation_defaults():
    v1, v2, v3 = defaults("moco_v1"), defaults("moco_v2"), defaults("moco_v3")
    assert (v1.queue_size, v1.momentum, v1.temperature, v1.mlp_head) == (65536, 0.999, 0.07, False)
    assert (v2.temperature, v2.mlp_head, v2.aug.blur_p) == (0.2, True, 0.5)
    assert (v3.temperature, v3.base_momentum, v3.proj_layers) == (0.2, 0.99, 3)
    dino = defaults("dino")
    assert (dino.student_temp, dino.center_momentum, dino.base_momentum) == (0.1, 0.9, 0.996)
    assert (dino.warmup_teacher_temp, dino.teacher_temp) == (0.04, 0.07)
    # BYOL's colour jitter, kept by MoCo v3 and DINO: brightness/contrast 0.4, saturation 0.2
    for cfg in (v3, dino):
        assert (0.8 * cfg.aug.jitter_strength, cfg.aug.saturation) == (0.4, 0.2)


def test_masked_and_predictive_defaults():
    mae = defaults("mae")
    assert (mae.mask_ratio, mae.decoder_depth, mae.decoder_dim) == (0.75, 8, 512) and mae.norm_pix
    cpc = defaults("cpc")
    assert (cpc.grid, cpc.steps, cpc.first_step, cpc.norm) == (7, 5, 2, "layer")
    loc = defaults("relative_loc")
    assert loc.gap > 2 * loc.jitter  # neighbouring patches never touch
    assert defaults("inpainting").disc_lr_ratio == 0.1  # the encoder learns 10x faster than D
