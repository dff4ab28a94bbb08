"""OWL-ViT retriever: scores are the detector's own logits, loading paths, tokenizer, a run."""

from __future__ import annotations

import inspect
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from safetensors.torch import save_file

from retrieval import create_retriever
from retrieval.config import load_config
from retrieval.errors import ConfigError, WeightsNotFoundError
from retrieval.representatives import Representatives
from retrieval.retrievers.clip_bpe import (
    TokenizerError,
    bundled_vocab,
    load_tokenizer,
    tokenize,
)
from retrieval.retrievers.owlvit import TINY_CONFIG, OwlViTRetriever
from retrieval.store.shards import ShardStore
from retrieval.text import embed_queries

QUERIES = ["a photo of a cat.", "dog", "a red traffic light!!", "the 2 wheeled bicycle's seat"]
TEXTS = [
    *QUERIES,
    "A Photo of the HOT-DOG, isn't it?",
    "café naïve résumé",
    "  spaced\tout\n text ",
    "a very very long sentence with far too many words to fit into sixteen tokens at all",
]


def _build(family: str, tmp_path_factory: pytest.TempPathFactory) -> OwlViTRetriever:
    """A tiny random-weight retriever of ``family`` (OWLv2 through a saved config.json)."""
    torch.manual_seed(0)
    config = "tiny"
    if family != "owlvit":
        from transformers import Owlv2Config

        folder = tmp_path_factory.mktemp("owlv2-config")
        Owlv2Config(**TINY_CONFIG).save_pretrained(folder)
        config = str(folder / "config.json")
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return create_retriever("owlvit", pretrained=None, config=config)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> OwlViTRetriever:
    return _build("owlvit", tmp_path_factory)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Noise images of different sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    sizes = [(80, 60), (50, 120), (96, 96)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _detector_outputs(retriever: OwlViTRetriever, pixels: torch.Tensor, texts: list[str]):
    """The library's own forward pass, every image with every query."""
    ids, mask = tokenize(retriever.tokenizer, texts, retriever.context_length)
    b = len(pixels)
    with torch.no_grad():
        return retriever.model(
            input_ids=ids.repeat(b, 1), attention_mask=mask.repeat(b, 1), pixel_values=pixels
        )


def _cached_snapshot(cache: Path, repo_id: str) -> Path:
    """An empty snapshot folder of ``repo_id`` in a hand-built Hugging Face cache."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    return snapshot


def _fp32_round_trip(reps: Representatives, root: Path) -> Representatives:
    store = ShardStore(root, dtype="float32")
    store.write_shard("rank000-00000", torch.arange(reps.batch_size), reps)
    (shard,) = list(store.iter_shards())
    return shard.reps


@pytest.mark.parametrize("family", ["owlvit", "owlv2"])
def test_scores_are_the_detectors_max_box_logit(
    family: str, images, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """For several images and queries, encode_images -> fp32 shard round trip -> score
    equals the max over boxes of ``<Family>ForObjectDetection(...).logits`` (1e-5), and
    the stored boxes, class embeddings and box count equal the forward's ``pred_boxes``
    (as xyxy), ``class_embeds`` and token grid. OWLv2 runs through the same code."""
    from transformers.image_transforms import center_to_corners_format

    retriever = _build(family, tmp_path_factory)
    assert retriever.config["family"] == family
    pixels = torch.stack([retriever.image_transform(im) for im in images])
    assert pixels.shape[1:] == (3, 96, 96)
    reps = _fp32_round_trip(retriever.encode_images(pixels), tmp_path)
    scores = retriever.score(retriever.encode_text(QUERIES), reps)

    out = _detector_outputs(retriever, pixels, QUERIES)
    assert reps.embeddings.shape[1] == retriever.config["boxes_per_image"] == 36
    torch.testing.assert_close(scores, out.logits.amax(dim=1).T, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(reps.boxes, center_to_corners_format(out.pred_boxes))
    torch.testing.assert_close(reps.embeddings, out.class_embeds)
    assert reps.mask.all()


def test_prompt_ensemble_is_scored_by_the_class_head(tiny: OwlViTRetriever, images) -> None:
    """The engine's prompt ensemble (mean of normalised template embeddings, normalised
    again) is a valid query: its score equals the detector's class head applied to it,
    and the text embeddings are the unit-norm ``text_embeds`` of the forward pass."""
    pixels = torch.stack([tiny.image_transform(im) for im in images])
    ensemble = embed_queries(tiny.encode_text, ["cat", "traffic light"], "imagenet80")
    scores = tiny.score(ensemble, tiny.encode_images(pixels))

    with torch.no_grad():
        feature_map = tiny.model.image_embedder(pixel_values=pixels)[0]
        feats = feature_map.flatten(1, 2)
        queries = ensemble.unsqueeze(0).expand(len(pixels), -1, -1)
        logits, _ = tiny.model.class_predictor(feats, queries)
    torch.testing.assert_close(scores, logits.amax(dim=1).T, atol=1e-5, rtol=1e-6)

    text = tiny.encode_text(QUERIES)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(len(QUERIES)))
    torch.testing.assert_close(text, _detector_outputs(tiny, pixels[:1], QUERIES).text_embeds[0])


def test_tokenizer_ids_equal_open_clip(tmp_path: Path) -> None:
    """The offline CLIP tokenizer gives open_clip's ids (incl. truncation, zero padding,
    "!!" as one token) at OWL-ViT's 16 and CLIP's 77 tokens, whether built from the
    bundled BPE or from a folder's vocab.json + merges.txt; a wrong-size vocabulary is
    refused rather than silently used."""
    reference = SimpleTokenizer()
    vocab, merges = bundled_vocab()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(map(" ".join, merges)))
    for tokenizer in (load_tokenizer(), load_tokenizer(tmp_path)):
        assert len(tokenizer) == 49408
        for length in (16, 77):
            ids, mask = tokenize(tokenizer, TEXTS, length)
            assert torch.equal(ids, reference(TEXTS, context_length=length))
            assert torch.equal(mask.bool(), ids != 0)  # TEXTS hold no lone "!" (id 0)

    (tmp_path / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    with pytest.raises(TokenizerError, match="2 tokens, expected 49408"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("hf_offline", [True, False])
def test_offline_without_cache_fails_at_once_and_says_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hf_offline: bool
) -> None:
    """A hub checkpoint that is not cached, with the hub unreachable (HF_HUB_OFFLINE or a
    refused endpoint): one error within seconds naming the repo, the missing files and
    both fixes; a local folder that lacks files is named too."""
    if not hf_offline:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        create_retriever("owlvit", pretrained="google/owlvit-base-patch16", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "google/owlvit-base-patch16" in message
    assert "config.json" in message
    assert "model.safetensors" in message
    assert "retriever.pretrained=DIR" in message
    assert str(tmp_path) in message

    with pytest.raises(WeightsNotFoundError, match="retriever.pretrained=.*no config.json"):
        create_retriever("owlvit", pretrained=str(tmp_path / "missing"))


def test_local_folder_and_hub_cache_load_identically(
    tiny: OwlViTRetriever, images, tmp_path: Path
) -> None:
    """The tiny model saved with save_pretrained loads from that folder, and from a
    hand-built Hugging Face cache under a hub id offline, with pretrained flags and
    identical image representatives and text embeddings."""
    folder = tmp_path / "folder"
    tiny.model.save_pretrained(folder)
    snapshot = _cached_snapshot(tmp_path / "cache", "google/owlvit-base-patch32")
    (snapshot / "config.json").write_text((folder / "config.json").read_text())
    state = {k: v.contiguous() for k, v in tiny.model.state_dict().items()}
    save_file(state, str(snapshot / "model.safetensors"))

    pixels = torch.stack([tiny.image_transform(im) for im in images])
    expected = tiny.encode_images(pixels)
    for loaded in (
        create_retriever("owlvit", pretrained=str(folder)),
        create_retriever("owlvit", cache_dir=str(tmp_path / "cache")),  # the default id
    ):
        assert not loaded.random_weights
        reps = loaded.encode_images(pixels)
        for got, want in ((reps.embeddings, expected.embeddings), (reps.boxes, expected.boxes)):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
        for key, value in expected.extras.items():
            torch.testing.assert_close(reps.extras[key], value, atol=0, rtol=0)
        torch.testing.assert_close(loaded.encode_text(QUERIES), tiny.encode_text(QUERIES))


def test_pretrained_folder_loads_exactly_the_saved_weights(images, tmp_path: Path) -> None:
    """retriever.pretrained=<folder written by save_pretrained of a tiny random
    OwlViTForObjectDetection> loads exactly those weights (every tensor equal, no RANDOM
    weights warning, random_weights False), and the retriever's scores and text
    embeddings equal the saved model's own forward on the same pixels and tokens."""
    from transformers import OwlViTConfig, OwlViTForObjectDetection

    torch.manual_seed(1)
    saved = OwlViTForObjectDetection(OwlViTConfig(**TINY_CONFIG)).eval()
    folder = tmp_path / "owlvit-tiny"
    saved.save_pretrained(folder)

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*RANDOM weights")
        loaded = create_retriever("owlvit", pretrained=str(folder))
    assert not loaded.random_weights
    assert loaded.config["pretrained"] == str(folder)
    assert loaded.config["architecture"] is None
    state = loaded.model.state_dict()
    assert state.keys() == saved.state_dict().keys()
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0, msg=key)

    pixels = torch.stack([loaded.image_transform(im) for im in images])
    ids, mask = tokenize(loaded.tokenizer, QUERIES, loaded.context_length)
    b = len(pixels)
    with torch.no_grad():
        out = saved(
            input_ids=ids.repeat(b, 1), attention_mask=mask.repeat(b, 1), pixel_values=pixels
        )
    text = loaded.encode_text(QUERIES)
    scores = loaded.score(text, loaded.encode_images(pixels))
    torch.testing.assert_close(scores, out.logits.amax(dim=1).T, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(text, out.text_embeds[0])


def test_pretrained_null_builds_random_weights_with_the_warning(tmp_path: Path) -> None:
    """retriever.pretrained=null builds random weights of retriever.config's architecture
    with the CLIP retrievers' RANDOM weights warning and random_weights=True; the default
    is the paper's B/32 hub id. retriever.config beside real weights, or an architecture
    that is no OWL model, is a ConfigError naming the key and the fix."""
    with pytest.warns(
        UserWarning,
        match=r"retriever\.pretrained=null: OWL-ViT \(tiny\) has RANDOM weights\. Every "
        r"metric of this run is meaningless",
    ):
        retriever = create_retriever("owlvit", pretrained=None, config="tiny")
    assert retriever.random_weights
    assert retriever.config["pretrained"] is None
    assert retriever.config["architecture"] == "tiny"
    default = inspect.signature(OwlViTRetriever).parameters["pretrained"].default
    assert default == "google/owlvit-base-patch32"

    with pytest.raises(ConfigError, match=r"retriever\.config='tiny' only applies to random"):
        create_retriever("owlvit", pretrained="google/owlvit-base-patch32", config="tiny")
    from transformers import CLIPConfig

    CLIPConfig().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="'clip' model; expected one of owlvit, owlv2"):
        create_retriever("owlvit", pretrained=None, config=str(tmp_path / "config.json"))


def test_repo_id_not_in_the_cache_fails_naming_it(tiny: OwlViTRetriever, tmp_path: Path) -> None:
    """Offline, with a test-made Hugging Face cache that holds google/owlvit-base-patch32
    and only the config.json of -base-patch16: both other ids fail at once with
    WeightsNotFoundError naming the id, exactly the missing files, the cache folder and
    the retriever.pretrained=DIR fix; the cached id loads."""
    cache = tmp_path / "cache"
    folder = tmp_path / "folder"
    tiny.model.save_pretrained(folder)
    snapshot = _cached_snapshot(cache, "google/owlvit-base-patch32")
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    partial = _cached_snapshot(cache, "google/owlvit-base-patch16")
    (partial / "config.json").write_bytes((folder / "config.json").read_bytes())

    for repo_id, missing in (
        ("google/owlvit-large-patch14", "config.json and model.safetensors"),
        ("google/owlvit-base-patch16", "Missing: model.safetensors or pytorch_model.bin of"),
    ):
        start = time.perf_counter()
        with pytest.raises(WeightsNotFoundError) as info:
            create_retriever("owlvit", pretrained=repo_id, cache_dir=str(cache))
        assert time.perf_counter() - start < 10
        message = str(info.value)
        assert message.startswith(f"retriever.pretrained={repo_id!r}: OWL-ViT")
        assert missing in message
        assert str(cache) in message
        assert "retriever.pretrained=DIR" in message
        assert "retriever.checkpoint" not in message
    assert not (cache / "models--google--owlvit-large-patch14").exists()
    loaded = create_retriever(
        "owlvit", pretrained="google/owlvit-base-patch32", cache_dir=str(cache)
    )
    assert not loaded.random_weights


@pytest.mark.parametrize(
    ("config", "repo_id"),
    [
        ("owlvit_b32_coco", "google/owlvit-base-patch32"),
        ("owlvit_b16_coco", "google/owlvit-base-patch16"),
        ("owlvit_l14_coco", "google/owlvit-large-patch14"),
    ],
)
def test_paper_configs_name_their_weights_in_pretrained(config: str, repo_id: str) -> None:
    """The shipped OWL-ViT experiments set retriever.pretrained to their hub id."""
    cfg = load_config(config)
    assert cfg.retriever.name == "owlvit"
    assert cfg.retriever.pretrained == repo_id
    assert cfg.retriever.config is None


@pytest.mark.parametrize("value", ["google/owlvit-base-patch32", "null"])
def test_old_checkpoint_key_is_refused(value: str, tmp_path: Path) -> None:
    """``retriever.checkpoint`` (the old name) fails before any work, on the command line
    and in a config file, as an unknown key whose message lists retriever.pretrained;
    from Python the option list names ``pretrained``."""
    with pytest.raises(ConfigError, match=r"unknown config key 'retriever\.checkpoint'") as info:
        load_config("owlvit_b32_coco", [f"retriever.checkpoint={value}"])
    assert "retriever.pretrained" in str(info.value)

    old = tmp_path / "old.yaml"
    old.write_text(f"retriever: {{name: owlvit, checkpoint: {value}}}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'retriever\.checkpoint'") as info:
        load_config(old)
    assert "retriever.pretrained" in str(info.value)

    with pytest.raises(ConfigError, match="has no option 'checkpoint'.* Options: pretrained"):
        create_retriever("owlvit", checkpoint=None if value == "null" else value)


def test_old_checkpoint_key_did_you_mean_names_pretrained() -> None:
    """The did-you-mean of the old key points at its new name, retriever.pretrained."""
    with pytest.raises(ConfigError, match=r"Did you mean 'retriever\.pretrained'\?"):
        load_config("owlvit_b32_coco", ["retriever.checkpoint=google/owlvit-base-patch32"])


def test_end_to_end_run_writes_metrics(synthetic_coco, tmp_path: Path) -> None:
    """`evaluate` on generated COCO-format data with the tiny OWL-ViT writes metrics.json,
    scores.npz and shards holding the per-box extras, one representative per box."""
    from retrieval.engine import evaluate

    ann, image_dir = synthetic_coco
    config = tmp_path / "owlvit_tiny.yaml"
    config.write_text(
        "defaults:\n  - dataset: synthetic\n"
        "retriever: {name: owlvit, pretrained: null, config: tiny}\n"
        "text: {prompts: single}\n"
        "loader: {batch_size: 8, num_workers: 0}\n"
        "logger: {wandb: {mode: disabled}}\n"
    )
    out = tmp_path / "run"
    result = evaluate(
        load_config(
            config,
            [
                f"data.annotations={ann}",
                f"data.images={image_dir}",
                f"run.output_dir={out}",
                "run.progress=false",
            ],
        )
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["random_weights"] is True
    assert metrics["retriever"]["family"] == "owlvit"
    assert metrics["reps_per_image"] == {"mean": 36.0, "max": 36}
    assert metrics["bytes_per_image"] > 36 * 32 * 2  # fp16 embeddings + boxes + extras
    assert 0 <= result.metrics["map"] <= 1
    scores = np.load(out / "scores.npz")["scores"]
    assert scores.shape[1] == 24
    assert np.isfinite(scores).all()
    shard = next(ShardStore(out / "embeddings").iter_shards())
    assert set(shard.reps.extras) == {"logit_shift", "logit_scale"}
