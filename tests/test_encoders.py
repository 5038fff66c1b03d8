"""Foundation-model presets, hub ids and weights: each preset builds offline with random weights, reloads through
`weights:`, gives its documented width and equals the model built as its authors build it."""

from __future__ import annotations

import json
import warnings

import httpx
import huggingface_hub
import pytest
import timm
import torch
import torchvision.transforms.v2.functional as TF
from safetensors.torch import save_file

from icmil_pl.encoders import PRESETS, WEIGHTS_MAP_ENV, PatchEmbedder, resolve_kwargs

# name: (feature dim, prefix tokens (class + registers), the number of tokens the authors' cls+mean skips or None)
DOCUMENTED = {
    "uni": (1024, 1, None),
    "uni2-h": (1536, 9, None),
    "virchow": (2560, 1, 1),
    "virchow2": (2560, 5, 5),
    "h-optimus-0": (1536, 5, None),
    "h-optimus-1": (1536, 5, None),
    "h0-mini": (768, 5, None),
    "prov-gigapath": (1536, 1, None),
    "kaiko-vit-s16": (384, 1, None),
    "kaiko-vit-b16": (768, 1, None),
    "kaiko-vit-l14": (1024, 5, None),
    "lunit-dino-s8": (384, 1, None),
}
SMALL = ["kaiko-vit-s16", "lunit-dino-s8", "h0-mini", "kaiko-vit-b16"]  # up to 86 M parameters: built in make test
LARGE = [name for name in DOCUMENTED if name not in SMALL]


def test_every_preset_is_documented_and_builds_its_architecture_offline():
    assert set(PRESETS) == set(DOCUMENTED)
    for name, (dim, prefix, _) in DOCUMENTED.items():
        with torch.device("meta"):  # the architecture only: 1.1 B parameters cost nothing here
            embedder = PatchEmbedder(name)
        assert embedder.feature_dim == dim == PRESETS[name].feature_dim, name
        assert embedder.backbone.num_prefix_tokens == prefix, name
        assert embedder.input_size == 224 and embedder.source["weights"] == "random init", name


def _reference(name: str, state: dict, images: torch.Tensor) -> torch.Tensor:
    """The preset as the field builds it: timm.create_model(<kwargs>), the authors' transform, the output mode."""
    preset = PRESETS[name]
    model = timm.create_model(preset.architecture, num_classes=0, **resolve_kwargs(preset.model_kwargs)).eval()
    model.load_state_dict(state)
    mode = TF.InterpolationMode.BICUBIC if preset.interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
    x = TF.resize(images.float() / 255, [preset.resize_size], interpolation=mode, antialias=True)
    x = TF.normalize(TF.center_crop(x, [preset.input_size]), list(preset.mean), list(preset.std))
    skipped = DOCUMENTED[name][2]
    with torch.no_grad():
        if skipped is None:
            return model(x)  # timm's class-token pooling
        tokens = model(x)  # global_pool="": all tokens (the Virchow model cards)
        return torch.cat([tokens[:, 0], tokens[:, skipped:].mean(1)], dim=1)


def _check_preset(name: str, tmp_path, formats: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    embedder = PatchEmbedder(name).eval()
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)  # 256 px patches, resized on the device
    with torch.no_grad():
        out = embedder(images)
    assert out.shape == (2, DOCUMENTED[name][0]) and out.dtype == torch.float32
    state = embedder.backbone.state_dict()
    torch.testing.assert_close(out, _reference(name, state, images), rtol=1e-5, atol=1e-5)
    for fmt in formats:
        path = tmp_path / f"{name}.{fmt}"
        if fmt == "safetensors":
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        elif fmt == "pt":  # our own embedder.pt: the PatchEmbedder's state dict
            torch.save(embedder.state_dict(), path)
        else:
            torch.save(state, path)
        torch.manual_seed(1)
        loaded = PatchEmbedder(name, weights=str(path)).eval()
        assert loaded.weights_hash() == embedder.weights_hash(), fmt
        assert loaded.provenance()["weights"] == str(path) and loaded.provenance()["hub_id"] == PRESETS[name].hub_id
        with torch.no_grad():
            assert torch.equal(loaded(images), out), fmt


@pytest.mark.parametrize("name", SMALL)
def test_small_presets_equal_their_reference_and_reload(name, tmp_path):
    formats = ("safetensors", "bin", "pth", "pt") if name == "kaiko-vit-s16" else ("safetensors",)
    _check_preset(name, tmp_path, formats)


@pytest.mark.slow
def test_large_presets_equal_their_reference_and_reload(tmp_path):
    for name in LARGE:  # one at a time: two copies of a 1.1 B-parameter ViT-g take 9 GB
        _check_preset(name, tmp_path, ("safetensors",))


def test_cls_plus_mean_skips_register_tokens():
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2, "reg_tokens": 3}
    embedder = PatchEmbedder("vit_small_patch16_224", model_kwargs=kwargs, output="cls+mean").eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        tokens = embedder.backbone.forward_features(embedder.preprocess(images))
        out = embedder(images)
    assert tokens.shape[1] == 1 + 3 + 16 and embedder.feature_dim == 32
    assert torch.equal(out, torch.cat([tokens[:, 0], tokens[:, 4:].mean(1)], dim=1))
    assert not torch.allclose(out[:, 16:], tokens[:, 1:].mean(1))  # a mean over out[:, 1:] would include registers


def test_class_valued_kwargs_are_dotted_paths():
    resolved = resolve_kwargs({"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU", "depth": 2})
    assert resolved["mlp_layer"] is timm.layers.SwiGLUPacked and resolved["act_layer"] is torch.nn.SiLU
    assert resolve_kwargs({"act_layer": "gelu"}) == {"act_layer": "gelu"}  # timm's own short names pass through
    with pytest.raises(ValueError, match=r"model_kwargs.mlp_layer: cannot import 'timm.layers.NoSuchMlp'"):
        resolve_kwargs({"mlp_layer": "timm.layers.NoSuchMlp"})


def test_refusals_give_the_reason():
    with pytest.raises(ValueError, match=r"neither a preset \(uni, uni2-h, virchow, .*lunit-dino-s8\)"):
        PatchEmbedder("uni3")
    with pytest.raises(ValueError, match="preset 'uni' is a ViT without stages to cut"):
        PatchEmbedder("uni", truncate_after="layer3")
    with pytest.raises(ValueError, match="vit_small_patch16_224 is a transformer without named stages"):
        PatchEmbedder("vit_small_patch16_224", truncate_after="blocks.3")
    with torch.device("meta"):
        with pytest.raises(ValueError, match="input_size=200: uni2-h cuts 14 px patches; use a multiple of 14"):
            PatchEmbedder("uni2-h", input_size=200)
        with pytest.raises(ValueError, match="feature_dim=1024: virchow2 with output cls\\+mean gives 2560-d"):
            PatchEmbedder("virchow2", feature_dim=1024)
    with pytest.raises(ValueError, match="is built for 224 px; add model_kwargs dynamic_img_size: true"):
        PatchEmbedder("vit_small_patch16_224", input_size=112)
    with pytest.raises(ValueError, match="output='cls': resnet18 has no class token"):
        PatchEmbedder("resnet18", output="cls")


def test_weights_of_another_architecture_name_the_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    other = PatchEmbedder("vit_small_patch16_224", model_kwargs={"depth": 2}).backbone.state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(path))
    with pytest.raises(ValueError, match=r"not this architecture's: \d+ tensors missing \(e.g. \['blocks.2"):
        PatchEmbedder("kaiko-vit-s16", weights=str(path))
    wide = PatchEmbedder("vit_small_patch16_224", model_kwargs={"embed_dim": 192, "num_heads": 3}).backbone
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"tensors of another shape, e.g. cls_token \(1, 1, 192\) != \(1, 1, 384\)"):
        PatchEmbedder("kaiko-vit-s16", weights=str(tmp_path / "wide.pth"))
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.bin: cannot read it as a state dict"):
        PatchEmbedder("kaiko-vit-s16", weights=str(tmp_path / "junk.bin"))


@pytest.fixture
def empty_offline_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_pretrained_preset_offline_says_how_to_go_on(empty_offline_hub):
    pattern = (
        r"1aurent/vit_small_patch16_224.kaiko_ai_towards_large_pathology_fms: weights are neither in the hub cache "
        rf"nor downloadable .* `weights: <file>` or map the model in the JSON file named by \${WEIGHTS_MAP_ENV}"
    )
    with pytest.raises(ValueError, match=pattern):
        PatchEmbedder("kaiko-vit-s16", pretrained=True)


def test_a_gated_model_names_its_licence_page_and_login(monkeypatch):
    from huggingface_hub.errors import GatedRepoError

    def gated(repo_id, filename, **kwargs):
        url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
        response = httpx.Response(401, request=httpx.Request("GET", url))
        raise GatedRepoError(f"Access to model {repo_id} is restricted.", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with torch.device("meta"), pytest.raises(ValueError) as error:
        PatchEmbedder("uni2-h", pretrained=True)
    message = str(error.value)
    assert "https://huggingface.co/MahmoodLab/UNI2-h" in message and "huggingface-cli login" in message
    assert "`weights: <file>`" in message


def test_hub_weights_record_the_revision(tmp_path, monkeypatch):
    """`pretrained: true` on a preset downloads its file once; provenance names the snapshot it came from."""
    torch.manual_seed(0)
    state = PatchEmbedder("kaiko-vit-s16").backbone.state_dict()
    snapshot = tmp_path / "models--x" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    embedder = PatchEmbedder("kaiko-vit-s16", pretrained=True)
    assert asked == [(PRESETS["kaiko-vit-s16"].hub_id, "model.safetensors")]
    assert embedder.provenance()["hub_revision"] == "0123abcd" and embedder.provenance()["weights"] == "hub"
    assert all(torch.equal(v, state[k]) for k, v in embedder.backbone.state_dict().items())


def test_a_weights_map_serves_clusters_without_internet(tmp_path, monkeypatch, empty_offline_hub):
    torch.manual_seed(0)
    source = PatchEmbedder("kaiko-vit-s16")
    (tmp_path / "weights").mkdir()
    torch.save(source.backbone.state_dict(), tmp_path / "weights" / "kaiko_s16.pth")
    table = tmp_path / "encoders.json"
    table.write_text(json.dumps({"kaiko-vit-s16": "weights/kaiko_s16.pth"}))  # relative to the JSON file
    monkeypatch.setenv(WEIGHTS_MAP_ENV, str(table))
    loaded = PatchEmbedder("kaiko-vit-s16", pretrained=True)
    assert loaded.weights_hash() == source.weights_hash()
    assert loaded.provenance()["weights"] == str(tmp_path / "weights" / "kaiko_s16.pth")
    table.write_text("{not json")
    with pytest.raises(ValueError, match=rf"\${WEIGHTS_MAP_ENV}=.*encoders.json: expected a readable JSON file"):
        PatchEmbedder("kaiko-vit-s16", pretrained=True)


def test_hub_ids_take_model_kwargs(monkeypatch):
    """`hf-hub:org/name` goes to timm with the kwargs; refused offline with the way out."""
    seen = {}

    def create_model(name, pretrained=False, **kwargs):
        seen.update(name=name, pretrained=pretrained, **kwargs)
        model = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, **kwargs)
        model.pretrained_cfg = {"input_size": (3, 32, 32), "crop_pct": 0.8, "mean": (0.5,) * 3, "std": (0.25,) * 3}
        return model

    monkeypatch.setattr(timm, "create_model", create_model)  # the module backbones.py calls
    kwargs = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU", "dynamic_img_size": True}
    embedder = PatchEmbedder("hf-hub:org/model", model_kwargs=kwargs, pretrained=True, output="cls")
    assert seen["name"] == "hf-hub:org/model" and seen["pretrained"] and seen["mlp_layer"] is timm.layers.SwiGLUPacked
    assert embedder.feature_dim == 16 and embedder(torch.zeros(1, 3, 48, 48, dtype=torch.uint8)).shape == (1, 16)
    assert (embedder.input_size, embedder.resize_size, embedder.mean.flatten()[0]) == (32, 40, 0.5)  # its data config


def test_patches_cut_otherwise_than_the_preset_authors_are_warned_about_once(monkeypatch):
    """256 px tiles resized to a 224 px model: H-optimus-0 and Virchow2 would see 0.571 um/px, not their 0.5."""
    from icmil_pl.encoders import embedder as module

    monkeypatch.setattr(module, "_WARNED", set())
    vit = PatchEmbedder("kaiko-vit-s16")
    expected = (
        r"tiling: kaiko-vit-s16 was trained on 224 px tiles at 0.5 um/px; this run cuts 256 px at 0.5 um/px, resized "
        r"to 224 px, so the model sees 0.571 um/px where its authors fed 0.5. Set tiling: \{mpp: 0.5, patch_size: "
        r"224\} \(experiments/encoders/kaiko-vit-s16.yaml does\)"
    )
    with pytest.warns(UserWarning, match=expected):
        vit.check_tiling(0.5, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the coupling and the next extraction read the same tiles
        assert vit.check_tiling(0.5, 256) is not None
        assert vit.check_tiling(0.5, 224) is None and vit.check_tiling(0.50001, 224) is None
        assert PatchEmbedder("resnet18", truncate_after="layer1").check_tiling(1.0, 64) is None  # no preset
    with pytest.warns(UserWarning, match="cuts 224 px at 1 um/px"):
        vit.check_tiling(1.0, 224)


def test_the_cli_mentions_a_preset_run_at_another_precision(capsys):
    from types import SimpleNamespace

    from icmil_pl.cli import ICMILCLI

    with torch.device("meta"):
        embedder = PatchEmbedder("uni2-h")
    for model, precision in [(embedder, "32-true"), (SimpleNamespace(embedder=embedder), "bf16-mixed")]:
        ICMILCLI._mention_precision(SimpleNamespace(model=model, trainer=SimpleNamespace(precision=precision)))
    assert capsys.readouterr().out == "note: uni2-h is usually run at precision bf16-mixed; this trainer runs 32-true\n"
