"""Building open_clip models from a pretrained tag, a local checkpoint, or random weights.

The pretrained tag path resolves the checkpoint in the Hugging Face cache first, so an
offline machine with a filled cache loads at once, and an offline machine without one
fails at once with a message naming the missing file, instead of retrying for ~46 s.
"""

from __future__ import annotations

import functools
import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast
from urllib.parse import urlparse

import open_clip
from PIL import Image
from torch import Tensor, nn

from retrieval.errors import ConfigError, WeightsNotFoundError
from retrieval.retrievers import timm_towers  # noqa: F401  (ViT-tiny-MAP's trunk)

if TYPE_CHECKING:
    # open_clip ships no type hints: what the retrievers use of its CLIP models.
    class ClipVisual(nn.Module):
        image_size: int | tuple[int, int]
        preprocess_cfg: dict[str, Any]

    class ClipModel(nn.Module):
        visual: ClipVisual

        def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor: ...
        def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor: ...


MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIGS)  # RN-tiny, ViT-tiny, ViT-tiny-MAP: fast checks

BUNDLED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
# pretrained names of weights shipped inside the package: name -> (model, file); one name
# per model, so retriever.pretrained alone says which weights a run used
BUNDLED = {
    "scenes": ("RN-scenes", BUNDLED_WEIGHTS / "RN-scenes.safetensors"),
    "scenes-vit": ("ViT-scenes", BUNDLED_WEIGHTS / "ViT-scenes.safetensors"),
}

HF_FILENAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
RANDOM_WEIGHTS_WARNING = (
    "retriever.pretrained=null: {model} has RANDOM weights. Every metric of this run is "
    "meaningless; use it to check the pipeline only."
)


@dataclass
class LoadedClip:
    """An open_clip model with what a retriever needs beside it."""

    model: ClipModel
    model_name: str
    preprocess: Callable[[Image.Image], Tensor]
    tokenizer: Callable[[list[str]], Tensor]
    random_weights: bool
    weights: str | None
    embed_dim: int


def joint_dim(model: nn.Module) -> int:
    """The image-text embedding width: the text projection's output, which sits on the
    model (CLIP) or on its text tower (``CustomTextCLIP``: SigLIP, a ``Linear`` there)."""
    projection = getattr(model, "text", model).text_projection
    if isinstance(projection, nn.Linear):
        return projection.out_features
    return int(cast(Tensor, projection).shape[-1])


def is_checkpoint_path(pretrained: str) -> bool:
    """A value naming a file rather than a tag (``openai``, ``laion2b_s34b_b79k``)."""
    return (
        os.sep in pretrained
        or pretrained.endswith(CHECKPOINT_SUFFIXES)
        or Path(pretrained).exists()
    )


def model_name_for(backbone: str, pretrained: str | None) -> str:
    """OpenAI weights need QuickGELU: ``RN50`` + ``openai`` -> ``RN50-quickgelu``."""
    if pretrained != "openai" or backbone.endswith("-quickgelu"):
        return backbone
    quick = f"{backbone}-quickgelu"
    return quick if quick in open_clip.list_models() else backbone


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def cached_hub_file(repo_id: str, filenames: tuple[str, ...], cache_dir: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(found, str):
            return found
    return None


def resolve_tag(model_name: str, tag: str, cache_dir: str | None) -> str | None:
    """The cached checkpoint file for a pretrained tag, None when it must be downloaded.

    Raises:
        WeightsNotFoundError: the tag is unknown, or nothing is cached and the hub is
            unreachable.
    """
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise WeightsNotFoundError(
            f"retriever.pretrained={tag!r} is not a known open_clip tag for {model_name} "
            f"(known: {', '.join(tags) or 'none'}) nor an existing checkpoint file."
        )
    hub = cfg.get("hf_hub", "")
    if not hub:
        if hub_reachable():
            return None
        _raise_missing(model_name, tag, cfg.get("url"), cache_dir)
    repo_id, filename = os.path.split(hub)  # "org/name/" -> default file names
    names = (filename,) if filename else HF_FILENAMES
    found = cached_hub_file(repo_id, names, cache_dir)
    if found or hub_reachable():
        return found
    _raise_missing(model_name, tag, f"{repo_id} ({' or '.join(names)})", cache_dir)


def _raise_missing(
    model_name: str, tag: str, source: str | None, cache_dir: str | None
) -> NoReturn:
    from huggingface_hub.constants import HF_HUB_CACHE

    raise WeightsNotFoundError(
        f"Pretrained weights {model_name} {tag!r} are not cached and the Hugging Face hub "
        f"is unreachable (offline). Missing: {source} in {cache_dir or HF_HUB_CACHE}.\n"
        f"Fix it one of two ways:\n"
        f"  1. on a machine with network run\n"
        f"       python -c \"import open_clip; open_clip.create_model('{model_name}', "
        f"pretrained='{tag}')\"\n"
        f"     and copy its Hugging Face cache folder here (set HF_HUB_CACHE or "
        f"retriever.cache_dir to it);\n"
        f"  2. pass a local checkpoint: retriever.pretrained=/path/to/weights.safetensors "
        f"(a state dict; .safetensors, .bin or .pt)."
    )


@functools.lru_cache(maxsize=16)
def file_sha256(path: str | None) -> str | None:
    """sha256 of a local checkpoint (None for tags still to download and random weights)."""
    if path is None or not Path(path).is_file():
        return None
    from retrieval.store.shards import sha256

    return sha256(Path(path))


@functools.lru_cache(maxsize=8)
def tokenizer_for(model_name: str) -> Callable[[list[str]], Tensor]:
    """open_clip's tokenizer, built once per model name (reading the BPE file is slow)."""
    return open_clip.get_tokenizer(model_name)


def load_open_clip(
    backbone: str,
    pretrained: str | None,
    cache_dir: str | None = None,
    image_size: int | None = None,
) -> LoadedClip:
    """Builds an open_clip model and its eval preprocessing, offline-safe.

    Args:
        backbone: open_clip model name (``RN50``, ``ViT-B-32`` ...).
        pretrained: a tag (``openai``), a checkpoint path, or None for random weights.
        cache_dir: Hugging Face / open_clip cache folder (default: the library's).
        image_size: force the model's input size (None: native).
    """
    model_name = model_name_for(backbone, pretrained)
    if model_name not in open_clip.list_models():
        raise ConfigError(
            f"retriever.backbone={backbone!r} is not an open_clip model. "
            f"Known ResNet/ViT CLIP models include: "
            f"{', '.join(m for m in open_clip.list_models() if m.startswith(('RN', 'ViT-B')))}"
        )
    extra: dict = {}
    weights: str | None = pretrained
    if pretrained in BUNDLED:
        model, path = BUNDLED[pretrained]
        if model_name != model:
            other = [name for name, (m, _) in BUNDLED.items() if m == model_name]
            hint = f", or retriever.pretrained={other[0]} for {backbone}" if other else ""
            raise ConfigError(
                f"retriever.pretrained={pretrained!r} holds weights for backbone {model}, "
                f"not {backbone}: set retriever.backbone={model}{hint}"
            )
        if not path.is_file():
            raise WeightsNotFoundError(
                f"bundled weights missing: {path}; reinstall the package or retrain them "
                f"with tools/train_scenes_clip.py"
            )
        weights = str(path)
    elif pretrained is None:
        warnings.warn(RANDOM_WEIGHTS_WARNING.format(model=model_name), stacklevel=2)
    elif is_checkpoint_path(pretrained):
        if not Path(pretrained).is_file():
            raise WeightsNotFoundError(
                f"retriever.pretrained={pretrained!r}: no such checkpoint file. Pass an "
                f"existing .safetensors/.bin/.pt state dict, or a tag such as 'openai'."
            )
    else:
        cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        cached = resolve_tag(model_name, pretrained, cache_dir)
        if cached is not None:
            weights = cached
            extra = {
                "image_mean": cfg.get("mean"),
                "image_std": cfg.get("std"),
                "image_interpolation": cfg.get("interpolation"),
                "image_resize_mode": cfg.get("resize_mode"),
            }
    if image_size is not None:
        extra["force_image_size"] = image_size
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name,
        pretrained=weights,
        cache_dir=cache_dir,
        **{k: v for k, v in extra.items() if v is not None},
    )
    model.eval()
    return LoadedClip(
        model=model,
        model_name=model_name,
        preprocess=preprocess,
        tokenizer=tokenizer_for(model_name),
        random_weights=pretrained is None,
        weights=weights,
        embed_dim=joint_dim(model),
    )
