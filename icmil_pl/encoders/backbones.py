"""A backbone from a name (a preset, a timm name, an `hf-hub:` id; CNNs optionally cut after a stage) and how it
reads uint8 patches (`Preprocessing`)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import timm
from torch import nn

from .presets import IMAGENET_MEAN, IMAGENET_STD, PRESETS, EncoderPreset, Interpolation
from .weights import hub_error

__all__ = ["Preprocessing", "build_backbone", "resolve_kwargs"]


@dataclass(frozen=True)
class Preprocessing:
    """How a backbone reads uint8 patches: resize the shorter side to `resize_size` (None: keep), cut the centre
    `input_size` square (None: keep), normalise with mean / std."""

    input_size: int | None
    resize_size: int | None
    mode: Interpolation
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def resolve(
        cls,
        backbone: nn.Module,
        name: str,
        preset: EncoderPreset | None,
        input_size: int | None = None,
        resize_size: int | None = None,
        interpolation: Interpolation | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> Preprocessing:
        """The given settings over the preset's; without a preset, a ViT's own input size (and a hub model's data
        config), and for CNNs no resize and ImageNet statistics. ViT input sizes are checked against the model."""
        vit = hasattr(backbone, "patch_embed") and hasattr(backbone, "forward_features")
        default = _preset_reading(preset) if preset else _vit_reading(backbone, name) if vit else {}
        size = input_size or default.get("input_size")
        resize = resize_size or default.get("resize_size") or size
        if size is not None and resize is not None and resize < size:
            raise ValueError(f"resize_size={resize} is smaller than input_size={size}")
        if vit:
            _check_vit_input(backbone, name, size)
        return cls(
            size,
            resize,
            interpolation or default.get("mode", "bilinear"),
            tuple(mean or default.get("mean", IMAGENET_MEAN)),
            tuple(std or default.get("std", IMAGENET_STD)),
        )


def _preset_reading(preset: EncoderPreset) -> dict[str, Any]:
    return {
        "input_size": preset.input_size,
        "resize_size": preset.resize_size,
        "mode": preset.interpolation,
        "mean": preset.mean,
        "std": preset.std,
    }


def _vit_reading(backbone: nn.Module, name: str) -> dict[str, Any]:
    """A timm ViT's own input size; for hub models also the resize, interpolation and mean / std of their data
    config."""
    if not name.startswith("hf-hub:"):
        size = backbone.patch_embed.img_size
        return {"input_size": int(size[0] if isinstance(size, tuple | list) else size)}
    cfg = timm.data.resolve_data_config({}, model=backbone)
    size = int(cfg["input_size"][-1])
    resize = int(round(size / cfg.get("crop_pct", 1.0)))
    mode = cfg.get("interpolation") if cfg.get("interpolation") in ("bilinear", "bicubic") else "bilinear"
    return {"input_size": size, "resize_size": resize, "mode": mode, "mean": cfg["mean"], "std": cfg["std"]}


def _check_vit_input(backbone: nn.Module, name: str, input_size: int | None) -> None:
    patch = backbone.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, tuple | list) else patch
    if input_size is not None and input_size % patch:
        raise ValueError(f"input_size={input_size}: {name} cuts {patch} px patches; use a multiple of {patch}")
    native = backbone.patch_embed.img_size
    native = native[0] if isinstance(native, tuple | list) else native
    if input_size is not None and input_size != native and not getattr(backbone, "dynamic_img_size", False):
        raise ValueError(
            f"input_size={input_size}: {name} is built for {native} px; add model_kwargs dynamic_img_size: true"
        )


_CLASS_VALUED = ("_layer", "_fn", "_cls")  # kwargs whose values timm wants as classes or callables


def resolve_kwargs(kwargs: Mapping[str, Any], where: str = "model_kwargs") -> dict[str, Any]:
    """`model_kwargs` with dotted-path strings of class-valued keys (`mlp_layer: timm.layers.SwiGLUPacked`,
    `act_layer: torch.nn.SiLU`) imported; short names timm resolves itself (`act_layer: gelu`) pass through."""
    resolved = {}
    for key, value in kwargs.items():
        if isinstance(value, str) and key.endswith(_CLASS_VALUED) and "." in value:
            module_name, _, attr = value.rpartition(".")
            try:
                value = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as error:
                raise ValueError(f"{where}.{key}: cannot import {value!r} ({error})") from error
        resolved[key] = value
    return resolved


def build_backbone(
    name: str, kwargs: Mapping[str, Any], pretrained: bool, truncate_after: str | None, drop_path_rate: float
) -> nn.Module:
    """The backbone with random (or, for timm names and `hf-hub:` ids, timm's pretrained) weights; preset weights
    are loaded by the caller (`hub_weights`, `load_weights`), so a preset's architecture never depends on the hub."""
    kwargs = resolve_kwargs(kwargs)
    hub = name.startswith("hf-hub:")
    if not hub and name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        raise ValueError(
            f"embedder backbone {name!r} is neither a preset ({', '.join(PRESETS)}), an `hf-hub:org/name` id nor a "
            "timm model name (see timm.list_models())"
        )
    if truncate_after is not None:
        # Built on the CPU, not the meta device: its random initialisation draws from the global generator, so the
        # truncated model that follows starts from the same random state as it always has, and so do a random-init
        # E_0 and every figure trained from one.
        probe = _create(name, False, {**kwargs, "num_classes": 0}, hub)
        info = getattr(probe, "feature_info", None)
        if hasattr(probe, "blocks") or not info:
            raise ValueError(
                f"truncate_after={truncate_after!r}: {name} is a transformer without named stages to cut; use its "
                "`output` (cls, cls+mean, pooled) instead"
            )
        stages = [stage["module"] for stage in info]
        if truncate_after not in stages:
            raise ValueError(f"truncate_after={truncate_after!r}: {name} has stages {stages}")
        kwargs |= {"features_only": True, "out_indices": (stages.index(truncate_after),)}
    else:
        kwargs["num_classes"] = 0
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    return _create(name, pretrained, kwargs, hub)


def _create(name: str, pretrained: bool, kwargs: dict[str, Any], hub: bool) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as error:  # huggingface_hub's cache misses, gated repositories and HTTP errors are OSErrors
        raise ValueError(hub_error(name.removeprefix("hf-hub:"), error, hub)) from error
    except TypeError as error:  # a kwarg the architecture does not take
        raise ValueError(f"embedder backbone {name!r}: model_kwargs rejected by timm: {error}") from error
