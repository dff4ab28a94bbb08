"""OWL-ViT (and OWLv2) as a retriever: one representative per predicted box.

The detector's class head turns every output token of the image tower into a box, a
class embedding and a per-box logit shift and scale. The image is stored as those
boxes; an image's score for a query is the maximum over its boxes of the model's own
class logit, recomputed from the stored embeddings and extras exactly as
``OwlViTClassPredictionHead`` does (see :func:`class_logits`), so re-scoring never runs
the image tower. Per box the store holds the class embedding divided by ``(|e| + 1e-6)``
(unit norm to 1e-6), the box (normalised ``xyxy``), and ``extras`` ``logit_shift`` and
``logit_scale`` (the multiplier, after the head's ``elu + 1``). In the default fp16 store
the embeddings round to ~1e-3 relative, which moves logits by about that much.

Query side: ``encode_text`` returns the L2-normalised ``text_embeds`` the detector feeds
its class head. The head divides query embeddings by their norm (+1e-6) anyway, so any
unit vector in that space is a valid query, and the engine's prompt ensemble (mean of
normalised template embeddings, normalised again) is one.

Weights: ``pretrained`` (``retriever.pretrained``, the key every retriever takes its
weights through) is a Hugging Face repo id (``google/owlvit-base-patch32``,
``-base-patch16``, ``-large-patch14``; OWLv2 ids work through the same code) resolved in
the Hugging Face cache first (offline: only there), or a local ``save_pretrained``
folder. ``pretrained=None`` builds random weights (pipeline checks only; a RANDOM
weights warning and ``random_weights=True``) with the architecture named by ``config``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias, cast

import torch
from PIL import Image
from torch import Tensor

from retrieval.errors import ConfigError, StoreError, WeightsNotFoundError
from retrieval.representatives import Representatives
from retrieval.retrievers.base import NEG_INF, Retriever, register_retriever
from retrieval.retrievers.clip_bpe import load_tokenizer, tokenize
from retrieval.retrievers.openclip_loader import cached_hub_file, hub_reachable

if TYPE_CHECKING:
    from transformers import (
        Owlv2ForObjectDetection,
        Owlv2Model,
        OwlViTForObjectDetection,
        OwlViTModel,
        PretrainedConfig,
    )

    OwlDetector: TypeAlias = OwlViTForObjectDetection | Owlv2ForObjectDetection

DEFAULT_PRETRAINED = "google/owlvit-base-patch32"
CONFIG_FILE = "config.json"
WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
# transformers class names per config.model_type: (detector, image processor).
FAMILIES = {
    "owlvit": ("OwlViTForObjectDetection", "OwlViTImageProcessor"),
    "owlv2": ("Owlv2ForObjectDetection", "Owlv2ImageProcessor"),
}
NORM_EPS = 1e-6  # the class head divides by (norm + 1e-6), not by max(norm, eps)
TINY = "tiny"
TINY_CONFIG: dict[str, Any] = {
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 16,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 96,
        "patch_size": 16,
    },
    "projection_dim": 32,
}
RANDOM_WEIGHTS_WARNING = (
    "retriever.pretrained=null: OWL-ViT ({arch}) has RANDOM weights. Every metric of this "
    "run is meaningless; use it to check the pipeline only."
)


def _transformers(name: str) -> Any:
    """A transformers class, imported on use: the registry imports this module eagerly."""
    import transformers

    return getattr(transformers, name)


def _is_local_path(name: str) -> bool:
    """A value meant as a folder or file, not a hub id (``org/name``)."""
    return Path(name).exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1


def _missing(folder: Path | None, weights: bool) -> list[str]:
    """The files a pretrained folder lacks (``config.json``, and weights when asked)."""
    missing = []
    if folder is None or not (folder / CONFIG_FILE).is_file():
        missing.append(CONFIG_FILE)
    if weights and (folder is None or not any((folder / f).is_file() for f in WEIGHT_FILES)):
        missing.append(" or ".join(WEIGHT_FILES[:2]))
    return missing


def _raise_not_cached(
    repo_id: str, missing: list[str], cache_dir: str | None, key: str
) -> NoReturn:
    from huggingface_hub.constants import HF_HUB_CACHE

    raise WeightsNotFoundError(
        f"{key}={repo_id!r}: OWL-ViT {repo_id!r} is not cached and the Hugging Face hub is "
        f"unreachable (offline). Missing: {' and '.join(missing)} of {repo_id} in "
        f"{cache_dir or HF_HUB_CACHE}.\n"
        f"Fix it one of two ways:\n"
        f"  1. on a machine with network run\n"
        f'       python -c "from transformers import AutoModelForZeroShotObjectDetection as M; '
        f"M.from_pretrained('{repo_id}')\"\n"
        f"     and copy its Hugging Face cache folder here (set HF_HUB_CACHE or "
        f"retriever.cache_dir to it);\n"
        f"  2. save it as a folder (model.save_pretrained(DIR), or "
        f"`hf download {repo_id} --local-dir DIR`) and pass {key}=DIR."
    )


def resolve_pretrained(name: str, cache_dir: str | None, weights: bool = True) -> Path | str:
    """A local folder (or ``config.json``) as a Path, or the hub repo id still to download.

    A hub id is looked up in the Hugging Face cache first, so a filled cache loads at once
    offline; without it and without a reachable hub this fails at once, naming the files
    (instead of huggingface_hub's retries).

    Args:
        name: a local ``save_pretrained`` folder, a ``config.json`` file (only with
            ``weights=False``), or a hub repo id.
        cache_dir: Hugging Face cache folder (default: the library's).
        weights: whether weight files are needed too (``retriever.pretrained``; False:
            the architecture only, ``retriever.config``).

    Raises:
        WeightsNotFoundError: nothing usable is there and nothing can be downloaded.
    """
    key = "retriever.pretrained" if weights else "retriever.config"
    if _is_local_path(name):
        path = Path(name).expanduser()
        if not weights and path.is_file():
            return path
        missing = _missing(path, weights)
        if missing:
            raise WeightsNotFoundError(
                f"{key}={name!r}: no {' and no '.join(missing)} there. Pass a folder written "
                f"by save_pretrained or a hub id such as {DEFAULT_PRETRAINED!r}"
                + (", or null for random weights (pipeline checks only)." if weights else ".")
            )
        return path
    config = cached_hub_file(name, (CONFIG_FILE,), cache_dir)
    snapshot = Path(config).parent if config else None
    missing = _missing(snapshot, weights)
    if snapshot is not None and not missing:
        return snapshot
    if hub_reachable():
        return name
    _raise_not_cached(name, missing, cache_dir, key)


def _from_pretrained(cls_name: str, source: Path | str, cache_dir: str | None, **kw: Any) -> Any:
    local = isinstance(source, Path)
    return _transformers(cls_name).from_pretrained(
        str(source), cache_dir=cache_dir, local_files_only=local, **kw
    )


def load_model(
    pretrained: str | None, config: str | None, cache_dir: str | None
) -> tuple[OwlDetector, Path | None]:
    """The detector in eval mode, and the local folder it came from (None: downloaded/random).

    Args:
        pretrained: repo id or local folder; None builds random weights.
        config: with ``pretrained=None``, the architecture: ``tiny`` (seconds-fast), a
            repo id, folder or ``config.json``; None = ``OwlViTConfig()`` (base-patch32).
        cache_dir: Hugging Face cache folder.
    """
    if pretrained is None:
        cfg = architecture(config, cache_dir)
        detector = _transformers(_family(cfg)[0])
        warnings.warn(RANDOM_WEIGHTS_WARNING.format(arch=config or "base-patch32"), stacklevel=3)
        return detector(cfg).eval(), None
    source = resolve_pretrained(pretrained, cache_dir)
    cfg = _from_pretrained("AutoConfig", source, cache_dir)
    model = _from_pretrained(_family(cfg)[0], source, cache_dir, dtype=torch.float32)
    return model.eval(), source if isinstance(source, Path) else None


def architecture(config: str | None, cache_dir: str | None) -> PretrainedConfig:
    """The model config of a random-weight build (see :func:`load_model`)."""
    if config is None:
        return _transformers("OwlViTConfig")()
    if config == TINY:
        return _transformers("OwlViTConfig")(**TINY_CONFIG)
    return _from_pretrained("AutoConfig", resolve_pretrained(config, cache_dir, False), cache_dir)


def _family(cfg: PretrainedConfig) -> tuple[str, str]:
    try:
        return FAMILIES[cfg.model_type]
    except KeyError:
        raise ConfigError(
            f"retriever owlvit: retriever.pretrained (or retriever.config) is a "
            f"{cfg.model_type!r} model; expected one of {', '.join(FAMILIES)} "
            f"(OwlViTForObjectDetection / Owlv2ForObjectDetection)."
        ) from None


class OwlPreprocess:
    """PIL -> ``[3, S, S]``: the family's own image processor at the model's input size.

    OWL-ViT squashes the image to ``S x S`` (bicubic); OWLv2 pads it to a square (bottom,
    right) first, so its boxes are fractions of that padded square.
    """

    def __init__(self, processor_class: str, size: int) -> None:
        self.processor = _transformers(processor_class)(size={"height": size, "width": size})

    def __call__(self, image: Image.Image) -> Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(cx, cy, w, h) -> (x0, y0, x1, y1)``, unclipped (a box may overhang the border)."""
    center, size = boxes[..., :2], boxes[..., 2:]
    return torch.cat([center - size / 2, center + size / 2], dim=-1)


def class_logits(text: Tensor, reps: Representatives) -> Tensor:
    """``[Q, B, R]`` the class head's logit of every box for every query.

    ``OwlViTClassPredictionHead``: with ``e`` the box's class embedding divided by
    ``(|e| + 1e-6)`` (stored that way) and ``q`` the query divided by ``(|q| + 1e-6)``,
    ``logit = (e . q + shift) * scale`` where ``scale = elu(raw scale) + 1`` (stored after
    the elu). Invalid boxes get ``-inf``.
    """
    extras = reps.extras or {}
    if "logit_shift" not in extras or "logit_scale" not in extras:
        raise StoreError(
            "OWL-ViT scoring needs extras 'logit_shift' and 'logit_scale' per box; these "
            "representatives lack them (embeddings made by another retriever or version?). "
            "Re-embed with retriever.name=owlvit."
        )
    q = text / (torch.linalg.norm(text, dim=-1, keepdim=True) + NORM_EPS)
    logits = torch.einsum("qd,brd->qbr", q, reps.embeddings.to(q.dtype))
    logits.add_(extras["logit_shift"].to(q.dtype)).mul_(extras["logit_scale"].to(q.dtype))
    return logits.masked_fill_(~reps.mask.unsqueeze(0), NEG_INF)


@register_retriever("owlvit")
class OwlViTRetriever(Retriever):
    """OWL-ViT boxes as representatives, scored by the detector's own class logit.

    Every image gets ``(S / patch)^2`` representatives (576 for B/32 and 2,304 for B/16
    at 768, 3,600 for L/14 at 840): the normalised class embedding of each predicted box,
    its box (normalised ``xyxy``) and, in ``extras``, its logit shift and scale.

    Args:
        pretrained: Hugging Face repo id (``google/owlvit-base-patch32``, ``-base-patch16``,
            ``-large-patch14``, or an OWLv2 id; offline it must be in the Hugging Face
            cache) or a local ``save_pretrained`` folder; None builds random weights
            (pipeline checks only).
        config: with ``pretrained=None``, the architecture: ``tiny`` (seconds-fast), a repo
            id, folder or ``config.json``; None = OWL-ViT base-patch32.
        cache_dir: Hugging Face cache folder (default: ``HF_HUB_CACHE``).
    """

    def __init__(
        self,
        pretrained: str | None = DEFAULT_PRETRAINED,
        config: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if pretrained is not None and config is not None:
            raise ConfigError(
                f"retriever.config={config!r} only applies to random weights "
                f"(retriever.pretrained=null); retriever.pretrained={pretrained!r} brings its "
                f"own config. Drop retriever.config, or set retriever.pretrained=null."
            )
        self.model, folder = load_model(pretrained, config, cache_dir)
        cfg = self.model.config
        # OwlViTConfig types its sub-configs as dict | config | None; its __post_init__
        # always turns them into config objects.
        text_cfg = cast("PretrainedConfig", cfg.text_config)
        vision_cfg = cast("PretrainedConfig", cfg.vision_config)
        self.tokenizer = load_tokenizer(folder)
        if len(self.tokenizer) != text_cfg.vocab_size:
            key = "pretrained" if pretrained is not None else "config"
            raise ConfigError(
                f"retriever.{key}={pretrained or config!r}: the CLIP tokenizer has "
                f"{len(self.tokenizer)} tokens but the model's text tower expects "
                f"{text_cfg.vocab_size}: not a CLIP-vocabulary OWL model."
            )
        self.context_length = int(text_cfg.max_position_embeddings)
        size, patch = int(vision_cfg.image_size), int(vision_cfg.patch_size)
        self.image_transform = OwlPreprocess(_family(cfg)[1], size)
        self.embed_dim = int(cfg.projection_dim)
        self.random_weights = pretrained is None
        self.config = {
            "family": cfg.model_type,
            "pretrained": pretrained,
            "architecture": config if pretrained is None else None,
            "image_size": size,
            "patch_size": patch,
            "boxes_per_image": (size // patch) ** 2,
        }

    def describe(self) -> dict[str, Any]:
        """:attr:`config`: family, weights or architecture, image and patch size."""
        return dict(self.config)

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Representatives:
        """One representative per predicted box, with what :func:`class_logits` needs."""
        feature_map = self.model.image_embedder(pixel_values=pixels)[0]
        b, h, w, d = feature_map.shape
        feats = feature_map.reshape(b, h * w, d)
        head = self.model.class_head
        embeds = head.dense0(feats)
        embeds = embeds / (torch.linalg.norm(embeds, dim=-1, keepdim=True) + NORM_EPS)
        shift = head.logit_shift(feats)[..., 0]
        scale = head.elu(head.logit_scale(feats))[..., 0] + 1
        boxes = cxcywh_to_xyxy(self.model.box_predictor(feats, feature_map))
        mask = torch.ones(b, h * w, dtype=torch.bool, device=pixels.device)
        return Representatives(embeds, mask, boxes, {"logit_shift": shift, "logit_scale": scale})

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """``[Q, D]`` the detector's query embeddings (``text_embeds``), L2-normalised."""
        ids, mask = tokenize(self.tokenizer, texts, self.context_length)
        # PreTrainedModel.base_model is typed nn.Module; here it is the detector's CLIP model.
        text_model = cast("OwlViTModel | Owlv2Model", self.model.base_model)
        out = text_model.get_text_features(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
        )
        emb = out.pooler_output
        return emb / torch.linalg.norm(emb, dim=-1, keepdim=True)

    def score(self, text: Tensor, reps: Representatives) -> Tensor:
        """``[Q, B]`` the best box's class logit (any sign; the metric ranks raw scores)."""
        return class_logits(text, reps).amax(dim=2)
