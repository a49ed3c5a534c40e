"""The zoo: taps on torchvision and timm models equal the values cloned when they were produced.

Each model, in eval and in train mode, is tapped at up to 8 names -- the values the model overwrites in
place later first, then ``:pre`` of activations, then others -- and compared with forward hooks and an fx
Interpreter that clone each value at production (:mod:`tests.tapcheck`), plus output and buffer equality
with the eager model, and no change to the model from ``layers()`` or ``tap()``.

The default run covers a representative subset (``QUICK``); the whole zoo is one command::

    python -m pytest -m zoo tests/test_zoo.py
"""
from __future__ import annotations

import pytest
import torch

from kdgraph.models import build_model
from tests.tapcheck import check_model

# torchvision: every classification model; input sizes where 32x32 is too small or a size is required.
# (inception_v3's train-mode auxiliary head needs 299; maxvit_t's 7x7 partitions need 224)
TV_SIZE = {"inception_v3": 299, "googlenet": 64, "alexnet": 64, "squeezenet1_0": 64, "squeezenet1_1": 64,
           "maxvit_t": 224}
TV_KWARGS = {"vit_b_16": {"image_size": 64}, "vit_b_32": {"image_size": 64}, "vit_l_16": {"image_size": 64},
             "vit_l_32": {"image_size": 64}, "vit_h_14": {"image_size": 56}}
TV_SIZE.update({k: v["image_size"] for k, v in TV_KWARGS.items()})

# timm: a broad sample of families (small variants), at the model's own size where it is fixed.
TIMM = [
    "resnet18", "resnet26d", "resnet50", "seresnext26d_32x4d", "resnext26ts", "res2net50_26w_4s", "resnest14d",
    "skresnet18", "ecaresnet26t", "resnetv2_50x1_bit", "resnetrs50", "resnetblur18", "wide_resnet50_2",
    "efficientnet_b0", "efficientnet_lite0", "tf_efficientnet_b0", "efficientnetv2_rw_t", "tf_efficientnetv2_b0",
    "mobilenetv2_100", "mobilenetv3_small_100", "mobilenetv3_large_100", "mobilenetv4_conv_small",
    "mnasnet_100", "fbnetc_100", "lcnet_050", "tinynet_a", "hardcorenas_a", "ghostnet_100", "ghostnetv2_100",
    "rexnet_100", "regnetx_002", "regnety_002", "regnetz_b16", "convnext_atto", "convnextv2_atto",
    "convnext_nano", "inception_next_tiny", "vit_tiny_patch16_224", "vit_small_patch16_224",
    "vit_base_patch32_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "deit3_small_patch16_224",
    "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "swinv2_cr_tiny_ns_224", "levit_128s",
    "levit_conv_128s", "maxvit_nano_rw_256", "maxxvit_rmlp_nano_rw_256", "coat_lite_tiny", "coat_tiny",
    "mixer_s16_224", "resmlp_12_224", "gmlp_ti16_224", "dpn68", "botnet26t_256", "halonet26t",
    "volo_d1_224", "twins_svt_small", "twins_pcpvt_small", "tiny_vit_5m_224", "efficientformer_l1",
    "efficientformerv2_s0", "mobilevit_xxs", "mobilevitv2_050", "edgenext_xx_small", "poolformer_s12",
    "poolformerv2_s12", "pvt_v2_b0", "cait_xxs24_224", "xcit_nano_12_p16_224", "convit_tiny",
    "crossvit_tiny_240", "davit_tiny", "fastvit_t8", "repvgg_a0", "dla34", "densenet121", "inception_v3",
    "hrnet_w18_small", "nf_resnet26", "nfnet_l0", "cspresnet50", "cspdarknet53", "darknet53", "vgg11",
    "selecsls42b", "hgnet_tiny", "hgnetv2_b0", "mambaout_femto", "efficientvit_b0", "efficientvit_m0",
    "repvit_m1", "starnet_s1", "rdnet_tiny", "ese_vovnet19b_dw", "gcvit_xxtiny", "nest_tiny", "pit_ti_224",
    "tnt_s_patch16_224", "sequencer2d_s", "focalnet_tiny_srf", "mvitv2_tiny", "hiera_tiny_224",
    "eva02_tiny_patch14_224", "gernet_s", "cs3darknet_s", "ghostnetv3_050", "fasternet_t0",
]

QUICK = ["torchvision:resnet18", "torchvision:efficientnet_b0", "torchvision:convnext_tiny",
         "torchvision:mobilenet_v3_small", "torchvision:shufflenet_v2_x0_5", "torchvision:squeezenet1_1",
         "timm:resnet18", "timm:efficientnet_b0", "timm:mobilenetv3_small_100", "timm:levit_128s",
         "timm:ghostnet_100", "timm:rexnet_100", "timm:vit_tiny_patch16_224"]


def _torchvision_names() -> list[str]:
    import torchvision

    return [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]


def _timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return [f"timm:{n}" for n in TIMM if timm.is_model(n)]


def _model_and_input(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    source, arch = name.split(":", 1)
    if source == "torchvision":
        model = build_model(name, num_classes=10, **TV_KWARGS.get(arch, {}))
        size = (3, TV_SIZE.get(arch, 32), TV_SIZE.get(arch, 32))
    else:
        model = build_model(name, num_classes=10)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        fixed = cfg.get("fixed_input_size", False) or not _runs_at(model, (3, 64, 64))
        size = tuple(cfg.get("input_size", (3, 224, 224))) if fixed else (3, 64, 64)
    return model, torch.randn(2, *size)


def _runs_at(model: torch.nn.Module, size: tuple) -> bool:
    try:
        with torch.no_grad():
            model.eval()(torch.randn(2, *size))
        return True
    except Exception:
        return False


def run(name: str) -> dict:
    model, x = _model_and_input(name)
    return check_model(model, x)


@pytest.mark.parametrize("name", QUICK)
def test_taps_exact_quick(name):
    run(name)


@pytest.mark.zoo
@pytest.mark.parametrize("name", _torchvision_names() + _timm_names())
def test_taps_exact(name):
    run(name)
