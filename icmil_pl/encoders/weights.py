"""Where a backbone's weights come from: the hub (`pretrained`), a local file (`weights`), or, for clusters without
internet, a JSON map named by `$ICMIL_PL_WEIGHTS` (preset name or hub id -> file); and loading them strictly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import timm
import torch
from torch import nn

from .presets import EncoderPreset, licence_page

__all__ = ["WEIGHTS_MAP_ENV", "hub_error", "hub_weights", "load_weights", "weights_from_map"]

WEIGHTS_MAP_ENV = "ICMIL_PL_WEIGHTS"  # a JSON file {preset name or hub id: local weights file}


def hub_error(hub_id: str, error: BaseException, gated: bool) -> str:
    """The one line for weights the hub did not give: gated without access, or not cached offline; with the ways out."""
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
            raise ValueError(hub_error(preset.hub_id, gated, True)) from gated
        except OSError as missing:  # not on the hub (EntryNotFoundError), not in the cache offline, HTTP errors
            error = missing
            continue
        revision = path.parent.name if path.parent.parent.name == "snapshots" else None
        return path, revision
    assert error is not None
    raise ValueError(hub_error(preset.hub_id, error, preset.gated)) from error


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
