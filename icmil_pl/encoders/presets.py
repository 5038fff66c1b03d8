"""Pathology foundation-model presets: the whole architecture (timm name + kwargs), so a preset builds offline with
random weights, and what its authors feed it: input size, resize / crop / interpolation, mean / std, which tokens make
the feature (`cls`, or `cls+mean`: the class token concatenated with the mean of the patch tokens, every class and
register token skipped) and the precision it is usually run at. Facts per model: `../shared/foundation-encoders.md`
and the models' own hub configs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "EncoderPreset",
    "Interpolation",
    "Output",
    "licence_page",
    "tiling_mismatch",
]

Output = Literal["pooled", "cls", "cls+mean"]  # timm's own pooled output, the class token, or class ++ patch mean
Interpolation = Literal["bilinear", "bicubic"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
_HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
_SWIGLU = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}


@dataclass(frozen=True)
class EncoderPreset:
    """One foundation model as its authors run it. `model_kwargs` go to `timm.create_model(architecture, ...)`
    beyond `num_classes=0`; class-valued ones are dotted paths (`resolve_kwargs`)."""

    hub_id: str
    architecture: str
    model_kwargs: Mapping[str, Any]
    feature_dim: int
    output: Output = "cls"
    input_size: int = 224
    resize_size: int = 224  # the shorter side is resized to this, then the centre `input_size` square is cut
    interpolation: Interpolation = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    precision: str = "bf16-mixed"  # Lightning's name for the precision the model is usually run at
    tile_px: int = 224  # the tiles its authors cut, in pixels at `tile_mpp` (resized to the input on the device)
    tile_mpp: float = 0.5
    gated: bool = True  # the hub asks users to accept a licence before downloading
    hub_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")  # tried in this order


def licence_page(hub_id: str) -> str:
    return f"https://huggingface.co/{hub_id}"


def _kaiko(architecture: str, model_kwargs: dict[str, Any], feature_dim: int) -> EncoderPreset:
    """kaiko.ai's models as timm checkpoints (1aurent's mirrors): mean / std 0.5, not gated, float32."""
    hub_id = f"1aurent/{architecture}.kaiko_ai_towards_large_pathology_fms"
    half = (0.5, 0.5, 0.5)
    return EncoderPreset(
        hub_id, architecture, model_kwargs, feature_dim, mean=half, std=half, precision="32-true", gated=False
    )


_VIRCHOW = EncoderPreset(
    "paige-ai/Virchow",
    "vit_huge_patch14_224",
    {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", **_SWIGLU, "dynamic_img_size": True},
    2560,
    output="cls+mean",
    interpolation="bicubic",
    precision="16-mixed",
)
_H_OPTIMUS = EncoderPreset(
    "bioptimus/H-optimus-0",
    "vit_giant_patch14_reg4_dinov2",
    {"img_size": 224, "init_values": 1e-5, "global_pool": "token", "dynamic_img_size": True},
    1536,
    mean=_HOPTIMUS_MEAN,
    std=_HOPTIMUS_STD,
    precision="16-mixed",
)

PRESETS: dict[str, EncoderPreset] = {
    "uni": EncoderPreset(
        "MahmoodLab/UNI",
        "vit_large_patch16_224",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        1024,
        precision="16-mixed",
        tile_px=256,  # 256 px at 20x, resized to 224 (the paper; TRIDENT's default)
    ),
    "uni2-h": EncoderPreset(
        "MahmoodLab/UNI2-h",
        "vit_giant_patch14_224",
        {
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            **_SWIGLU,
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        1536,
        tile_px=256,  # as UNI: 256 px at 20x, resized to 224
    ),
    "virchow": _VIRCHOW,
    "virchow2": replace(_VIRCHOW, hub_id="paige-ai/Virchow2", model_kwargs={**_VIRCHOW.model_kwargs, "reg_tokens": 4}),
    "h-optimus-0": _H_OPTIMUS,
    "h-optimus-1": replace(_H_OPTIMUS, hub_id="bioptimus/H-optimus-1"),
    "h0-mini": EncoderPreset(  # mlp_ratio inferred from the published 86M parameters: its hub config is not public
        "bioptimus/H0-mini",
        "vit_base_patch14_reg4_dinov2",
        {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 2.66667 * 2, **_SWIGLU, "dynamic_img_size": True},
        768,
        mean=_HOPTIMUS_MEAN,
        std=_HOPTIMUS_STD,
        precision="16-mixed",
    ),
    "prov-gigapath": EncoderPreset(
        "prov-gigapath/prov-gigapath",
        "vit_giant_patch14_dinov2",
        {
            "img_size": 224,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
            "dynamic_img_size": True,
        },
        1536,
        resize_size=256,
        interpolation="bicubic",
        precision="16-mixed",
        tile_px=256,  # 256 px at 0.5 um/px, centre crop 224
    ),
    "kaiko-vit-s16": _kaiko("vit_small_patch16_224", {"dynamic_img_size": True}, 384),
    "kaiko-vit-b16": _kaiko("vit_base_patch16_224", {"dynamic_img_size": True}, 768),
    # trained at 518 px, run at 224 (dynamic size)
    "kaiko-vit-l14": _kaiko("vit_large_patch14_reg4_dinov2", {"img_size": 518, "dynamic_img_size": True}, 1024),
    "lunit-dino-s8": EncoderPreset(  # Lunit's own training statistics (TRIDENT feeds ImageNet's)
        "1aurent/vit_small_patch8_224.lunit_dino",
        "vit_small_patch8_224",
        {"dynamic_img_size": True},
        384,
        mean=(0.70322989, 0.53606487, 0.66096631),
        std=(0.21716536, 0.26081574, 0.20723464),
        precision="32-true",
        gated=False,
    ),
}


def tiling_mismatch(name: str | None, mpp: float, patch_size: int, resize_size: int) -> str | None:
    """Why patches of `patch_size` px at `mpp` um/px, resized to `resize_size`, are not what preset `name` was
    trained on (another size is resized on the device, so the model sees another scale); None where they are, or
    where `name` is no preset."""
    preset = PRESETS.get(name) if name else None
    if preset is None or (patch_size == preset.tile_px and math.isclose(mpp, preset.tile_mpp, rel_tol=1e-3)):
        return None
    seen, theirs = patch_size * mpp / resize_size, preset.tile_px * preset.tile_mpp / preset.resize_size
    return (
        f"tiling: {name} was trained on {preset.tile_px} px tiles at {preset.tile_mpp:g} um/px; this run cuts "
        f"{patch_size} px at {mpp:g} um/px, resized to {resize_size} px, so the model sees {seen:.3g} um/px where its "
        f"authors fed {theirs:.3g}. Set tiling: {{mpp: {preset.tile_mpp:g}, patch_size: {preset.tile_px}}} "
        f"(experiments/encoders/{name}.yaml does)"
    )
