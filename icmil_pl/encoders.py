"""Patch encoders by name: timm architectures, `hf-hub:` ids and pathology foundation-model presets, with their
preprocessing and weights.

A preset spells out the whole architecture (timm name + kwargs), so it builds offline with random weights, and
carries what the model's authors feed it: input size, resize / crop / interpolation, mean / std, which tokens make the
feature (`cls`, or `cls+mean`: the class token concatenated with the mean of the patch tokens, every class and
register token skipped) and the precision it is usually run at. Weights come from the hub (`pretrained`), from a
local file (`weights`), or from a JSON map named by `$ICMIL_PL_WEIGHTS` (preset or hub id -> file) for clusters
without internet. Facts per model: `../shared/foundation-encoders.md` and the models' own hub configs.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from torch import nn

__all__ = [
    "PRESETS",
    "WEIGHTS_MAP_ENV",
    "EncoderPreset",
    "Output",
    "Preprocessing",
    "build_backbone",
    "hub_weights",
    "load_weights",
    "resolve_kwargs",
    "weights_from_map",
]

Output = Literal["pooled", "cls", "cls+mean"]  # timm's own pooled output, the class token, or class ++ patch mean
Interpolation = Literal["bilinear", "bicubic"]
WEIGHTS_MAP_ENV = "ICMIL_PL_WEIGHTS"  # a JSON file {preset name or hub id: local weights file}

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
        raise ValueError(_hub_error(name.removeprefix("hf-hub:"), error, hub)) from error
    except TypeError as error:  # a kwarg the architecture does not take
        raise ValueError(f"embedder backbone {name!r}: model_kwargs rejected by timm: {error}") from error


def _hub_error(hub_id: str, error: BaseException, gated: bool) -> str:
    from huggingface_hub.errors import GatedRepoError

    if isinstance(error, GatedRepoError):
        return (
            f"{hub_id} is gated on the Hugging Face hub and this account has no access: accept the licence at "
            f"{licence_page(hub_id)}, then `huggingface-cli login`; or give a local file as `weights: <file>`"
        )
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return (
        f"{hub_id}: weights are neither in the hub cache nor downloadable{offline} ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}); offline, give a local file as `weights: <file>` or map "
        f"the model in the JSON file named by ${WEIGHTS_MAP_ENV}; or `pretrained: false` for random weights"
        + (f"; the model is gated: its licence is at {licence_page(hub_id)}" if gated else "")
    )


def hub_weights(preset: EncoderPreset) -> tuple[Path, str | None]:
    """Downloads (or finds in the hub cache) a preset's weights file; returns its path and the hub revision."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError

    error: BaseException | None = None
    for filename in preset.hub_files:
        try:
            path = Path(hf_hub_download(preset.hub_id, filename))
        except GatedRepoError as gated:
            raise ValueError(_hub_error(preset.hub_id, gated, True)) from gated
        except OSError as missing:  # not on the hub (EntryNotFoundError), not in the cache offline, HTTP errors
            error = missing
            continue
        revision = path.parent.name if path.parent.parent.name == "snapshots" else None
        return path, revision
    assert error is not None
    raise ValueError(_hub_error(preset.hub_id, error, preset.gated)) from error


def weights_from_map(*keys: str) -> Path | None:
    """The local weights file `$ICMIL_PL_WEIGHTS` maps the first of `keys` it holds (a preset name, a hub id) to."""
    source = os.environ.get(WEIGHTS_MAP_ENV)
    if not source:
        return None
    path = Path(source)
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"${WEIGHTS_MAP_ENV}={source}: expected a readable JSON file {{name: weights file}} ({error})"
        ) from error
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise ValueError(f"${WEIGHTS_MAP_ENV}={source}: expected a JSON object {{name: weights file}}")
    key = next((k for k in keys if k in table), None)
    if key is None:
        return None
    file = Path(table[key]).expanduser()
    return file if file.is_absolute() else path.parent / file


_HEAD_PREFIXES = ("head.", "fc.", "classifier.", "head_drop.")  # a classifier's head: backbones here have none


def load_weights(backbone: nn.Module, path: Path, truncated: bool = False) -> None:
    """A local checkpoint into `backbone`, strictly: a `.safetensors` file, a `.bin` / `.pth` state dict, a
    Lightning checkpoint, or our own `embedder.pt` (keys under `backbone.`). Classifier-head keys are ignored, and
    with `truncated` the stages past the cut too; any other mismatch names the keys."""
    if not path.is_file():
        raise ValueError(f"embedder weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated download, a pickle with code in it, another format
        raise ValueError(f"embedder weights {path}: cannot read it as a state dict ({error})") from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"embedder weights {path}: expected a state dict, got {type(state).__name__}")
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    if isinstance(backbone, timm.models.VisionTransformer):  # position embeddings of another grid, dinov2 layouts
        state = timm.models.vision_transformer.checkpoint_filter_fn(state, backbone)
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and not k.startswith(_HEAD_PREFIXES) and not truncated]
    if missing or unexpected:
        raise ValueError(
            f"embedder weights {path}: not this architecture's: {len(missing)} tensors missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        key, got, want = wrong[0]
        raise ValueError(f"embedder weights {path}: {len(wrong)} tensors of another shape, e.g. {key} {got} != {want}")
    backbone.load_state_dict({k: state[k] for k in expected})
