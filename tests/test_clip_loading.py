"""The real weight-loading paths: a checkpoint file, a Hugging Face cache folder, offline."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from retrieval import create_retriever
from retrieval.retrievers.openclip_loader import WeightsNotFoundError


def _random_state(model_name: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None)
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def _assert_loaded(retriever, state: dict[str, torch.Tensor]) -> None:
    loaded = retriever.model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key].float(), value.float(), msg=key)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_file_loads(tmp_path: Path, suffix: str) -> None:
    """retriever.pretrained=<file> loads exactly the saved state dict."""
    state = _random_state("RN-tiny", seed=1)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    retriever = create_retriever("clip", backbone="RN-tiny", pretrained=str(path))
    assert not retriever.random_weights
    _assert_loaded(retriever, state)


def test_missing_checkpoint_file_is_named(tmp_path: Path) -> None:
    """A checkpoint path that does not exist fails naming it."""
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsNotFoundError, match="nope.safetensors"):
        create_retriever("clip", backbone="RN-tiny", pretrained=str(missing))


@pytest.mark.slow
def test_openai_tag_loads_from_hand_built_hf_cache(tmp_path: Path) -> None:
    """``pretrained='openai'`` resolves RN50 -> RN50-quickgelu and loads the checkpoint
    from a Hugging Face cache folder offline, with OpenAI's preprocessing."""
    state = _random_state("RN50-quickgelu", seed=2)
    repo = tmp_path / "models--timm--resnet50_clip.openai"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    weights = snapshot / "open_clip_model.safetensors"
    save_file({k: v.half() for k, v in state.items()}, str(weights))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")

    retriever = create_retriever(
        "clip", backbone="RN50", pretrained="openai", cache_dir=str(tmp_path)
    )
    assert retriever.model_name == "RN50-quickgelu"
    for key, value in state.items():
        torch.testing.assert_close(
            retriever.model.state_dict()[key].float(), value.half().float(), msg=key
        )
    normalize = retriever.image_transform.transforms[-1]
    assert tuple(normalize.mean) == pytest.approx((0.48145466, 0.4578275, 0.40821073))


@pytest.mark.parametrize("hf_offline", [True, False])
def test_offline_without_cache_fails_at_once_and_says_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hf_offline: bool
) -> None:
    """No cached weights and no reachable hub: one clear error naming the missing file
    and both fixes, whether HF_HUB_OFFLINE says so or the endpoint refuses connections
    (instead of huggingface_hub's retry storm)."""
    if not hf_offline:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    with pytest.raises(WeightsNotFoundError) as info:
        create_retriever("clip", backbone="RN50", pretrained="openai", cache_dir=str(tmp_path))
    message = str(info.value)
    assert "RN50-quickgelu" in message
    assert "resnet50_clip.openai" in message
    assert "retriever.pretrained=/path/to" in message
    assert "HF_HUB_CACHE" in message


def test_unknown_tag_lists_known_tags() -> None:
    """A tag open_clip does not know fails listing the known ones."""
    with pytest.raises(WeightsNotFoundError, match="openai"):
        create_retriever("clip", backbone="RN50", pretrained="laion9000")


def test_random_weights_warn_loudly() -> None:
    """pretrained=None builds random weights, flags them, and warns."""
    with pytest.warns(UserWarning, match="RANDOM weights"):
        retriever = create_retriever("clip", backbone="RN-tiny", pretrained=None)
    assert retriever.random_weights
