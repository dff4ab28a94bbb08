"""Trains RN-scenes or ViT-scenes, small CLIPs, on generated scenes: the offline benchmark.

Pretrained CLIP weights cannot be downloaded offline, and random weights give chance
metrics. This script trains an open_clip ModifiedResNet CLIP (``RN-scenes``, attention
pool, so Dense-CLIP and Cluster-CLIP apply unchanged) with the standard contrastive loss
on 64x64 scenes from ``retrieval.data.synthetic`` (preset ``train``): 1-4 coloured
shapes on cluttered backgrounds, each captioned with its objects ("a photo of a red
circle and a small blue star."). The held-out colour-shape pairs
(``HELD_OUT_PAIRS``) are never drawn, so retrieving them later is open-vocabulary.

Why it shows the paper's effect: the model sees objects 6 to 43 px wide in 64 px
images. The global retriever squeezes a 256 px evaluation image into 64 px, so an
object under ~32 px shrinks below what the model ever saw; Dense-CLIP reads the same
image at 256 px (8 x 8 cells), where each cell sees small objects at their training
scale.

``--model ViT-scenes`` trains the same way a small ViT (``retrieval/model_configs/
ViT-scenes.json``: 8 px patches, class-token pooling), the model of the ViT rows
(``configs/experiment/scenes_vit_*``, Dense-CLIP's attention variants); its weights
default to ``retrieval/weights/ViT-scenes.safetensors`` (``retriever.pretrained=scenes-vit``).

Usage::

    python tools/train_scenes_clip.py                       # the shipped recipe
    python tools/train_scenes_clip.py --model ViT-scenes --steps 1000   # the shipped ViT
    python tools/train_scenes_clip.py --steps 200 --out /tmp/try.safetensors  # a quick try

Outputs: the weights (fp16 safetensors), a JSON-lines log, the loss curve PNG and the
model card (``--card``). Every random choice is seeded (torch, the caption sampler, the
scene renderer), so a rerun with the same seed and thread count should give the same
weights (not checked bit for bit: a full run takes ~25 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# Sleep, don't spin, at OpenMP barriers: on a shared 2-core machine a busy neighbour
# process makes spinning threads 3x slower than one thread (measured); waiting passively
# costs nothing when the cores are free. Must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import open_clip  # noqa: E402

from retrieval.data.synthetic import (  # noqa: E402
    HELD_OUT_PAIRS,
    SyntheticOptions,
    caption,
    object_phrase,
    pair_name,
    render_scene,
    scenes_options,
    size_word,
)
from retrieval.retrievers.openclip_loader import BUNDLED  # noqa: E402  (registers *-scenes)

WEIGHTS = dict(BUNDLED.values())
"""Model -> where its shipped weights live (the card: the same name, ``.md``)."""
TEMPLATES = (
    "a photo of {}.",
    "a photo of {}.",
    "a picture of {}.",
    "an image of {}.",
    "{}.",
    "a photo with {}.",
)
"""Caption templates; the benchmark queries with "a photo of a {}." (text.prompts=single)."""


@dataclass
class Recipe:
    """Everything that decides the trained weights (with the torch version and threads)."""

    model: str = "RN-scenes"
    steps: int = 1200
    batch_size: int = 256
    lr: float = 2e-3
    min_lr: float = 2e-5
    warmup: int = 100
    weight_decay: float = 0.1
    pool_size: int = 50_000
    pool_seed: int = 0
    seed: int = 0
    size_words: float = 0.5
    hard_negatives: bool = True
    flip: bool = True
    threads: int = 2


# ---------------------------------------------------------------- the training scenes


def _render_chunk(args: tuple[SyntheticOptions, int, int]) -> tuple[np.ndarray, list]:
    options, start, stop = args
    pixels = np.empty((stop - start, *options.image_size[::-1], 3), np.uint8)
    objects = []
    for k, index in enumerate(range(start, stop)):
        image, objs = render_scene(index, options)
        buffer = io.BytesIO()  # the evaluation images are JPEGs: train on the same artefacts
        image.save(buffer, format="JPEG", quality=options.jpeg_quality)
        pixels[k] = np.asarray(Image.open(buffer).convert("RGB"))
        objects.append([(o.colour, o.shape.name, round(o.area, 1)) for o in objs])
    return pixels, objects


def scene_pool(options: SyntheticOptions, cache_dir: Path | None, workers: int):
    """``[N, H, W, 3]`` uint8 scenes and each one's objects ``(colour, shape, area)``.

    Rendered once (scene ``i`` is a function of the options and ``i`` only) and cached
    under ``cache_dir`` keyed by the options, so a rerun starts training at once.
    """
    key = hashlib.sha1(json.dumps(asdict(options), sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir / f"scenes-train-{key}.npz" if cache_dir else None
    if path is not None and path.exists():
        data = np.load(path, allow_pickle=False)
        return data["pixels"], json.loads(str(data["objects"]))
    chunk = 500
    jobs = [
        (options, s, min(s + chunk, options.num_images + 1))
        for s in range(1, options.num_images + 1, chunk)
    ]
    pixels, objects = [], []
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for part, objs in tqdm(
            pool.imap(_render_chunk, jobs), total=len(jobs), desc="rendering scenes", unit="chunk"
        ):
            pixels.append(part)
            objects += objs
    pixels = np.concatenate(pixels)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, pixels=pixels, objects=np.array(json.dumps(objects)))
    return pixels, objects


def sample_caption(objects: Sequence, image_area: float, rng: random.Random, size_p: float) -> str:
    """A caption of one scene: objects in random order, a random template, size words
    (small / large) with probability ``size_p``."""
    objs = list(objects)
    rng.shuffle(objs)
    sizes = rng.random() < size_p
    phrases = [object_phrase(c, s, size_word(a, image_area) if sizes else None) for c, s, a in objs]
    return caption(phrases, rng.choice(TEMPLATES))


def scene_key(objects: Sequence) -> tuple:
    """What a caption says about a scene: the multiset of its (colour, shape) pairs."""
    return tuple(sorted((c, s) for c, s, *_ in objects))


def match_targets(images: Sequence, texts: Sequence) -> torch.Tensor:
    """``[I, T]`` 1 where text ``t`` describes image ``i`` exactly (same objects)."""
    ids: dict[tuple, int] = {}
    a = torch.tensor([ids.setdefault(scene_key(o), len(ids)) for o in images])
    b = torch.tensor([ids.setdefault(scene_key(o), len(ids)) for o in texts])
    return (a[:, None] == b[None, :]).float()


def hard_negative(
    objects: Sequence, rng: random.Random, colours: Sequence[str], shapes: Sequence[str]
) -> list | None:
    """The scene's objects with one thing changed: a shape (half the time), a colour, or
    the colours of two objects swapped (binding). Never a held-out pair (those are never
    captioned in training); None when no change is possible.

    As NegCLIP's hard negatives: a caption that differs from the true one only in one
    shape or one binding, so colour alone cannot win the contrastive loss.
    """
    objs = [list(o) for o in objects]
    held = set(HELD_OUT_PAIRS)
    for _ in range(10):
        out = [o[:] for o in objs]
        kind = rng.random()
        k = rng.randrange(len(out))
        if kind < 0.5:
            out[k][1] = rng.choice([s for s in shapes if s != out[k][1]])
        elif kind < 0.75 or len(out) < 2:
            out[k][0] = rng.choice([c for c in colours if c != out[k][0]])
        else:
            j = rng.choice([j for j in range(len(out)) if j != k])
            out[k][0], out[j][0] = out[j][0], out[k][0]
        if scene_key(out) != scene_key(objs) and all(
            pair_name(c, s) not in held for c, s, _ in out
        ):
            return out
    return None


# ---------------------------------------------------------------- a quick probe


@torch.no_grad()
def probe(model, tokenizer, probe_pixels, probe_pairs, mean, std) -> dict[str, float]:
    """Zero-shot pair classification of single-object 64 px scenes (held-out pairs too):
    top-1 over all 64 pairs, on seen and on held-out pairs, and of the colour and shape."""
    model.eval()
    options = scenes_options("train", draw_held_out=True)
    names = [pair_name(c, s) for c, s in options.pairs]
    text = F.normalize(model.encode_text(tokenizer([f"a photo of a {n}." for n in names])), dim=-1)
    x = (torch.from_numpy(probe_pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    image = F.normalize(model.encode_image(x), dim=-1)
    guess = [names[i] for i in (image @ text.T).argmax(dim=1).tolist()]
    truth = [pair_name(c, s) for c, s in probe_pairs]
    held = np.array([t in HELD_OUT_PAIRS for t in truth])
    hit = np.array([g == t for g, t in zip(guess, truth, strict=True)])
    colour = np.array([g.split()[0] == t.split()[0] for g, t in zip(guess, truth, strict=True)])
    shape = np.array([g.split()[1] == t.split()[1] for g, t in zip(guess, truth, strict=True)])
    model.train()
    return {
        "pair_seen": float(hit[~held].mean()),
        "pair_held_out": float(hit[held].mean()),
        "colour": float(colour.mean()),
        "shape": float(shape.mean()),
    }


def probe_set(n: int = 512) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """``n`` single-object 64 px scenes (objects >= 150 px), a quarter of them held-out pairs."""
    options = scenes_options(
        "train", seed=99, objects_per_image=(1, 1), min_area=150.0, draw_held_out=True
    )
    want = {True: n // 4, False: n - n // 4}
    pixels, pairs, index = [], [], 0
    while any(want.values()):
        index += 1
        image, objs = render_scene(index, options)
        pair = (objs[0].colour, objs[0].shape.name)
        held = pair_name(*pair) in HELD_OUT_PAIRS
        if want[held]:
            want[held] -= 1
            pixels.append(np.asarray(image))
            pairs.append(pair)
    return np.stack(pixels), pairs


# ---------------------------------------------------------------- training


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No decay on gains, biases, the temperature, embeddings and positional tables."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        flat = p.ndim < 2 or "bn" in name or "logit_scale" in name
        table = "embedding" in name or "positional" in name
        (rest if flat or table else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * t))


def save_weights(model: torch.nn.Module, path: Path, meta: dict[str, str]) -> None:
    """fp16 floating tensors (halves the file; the loader casts back to fp32)."""
    state = {
        k: (v.half() if v.is_floating_point() else v).contiguous()
        for k, v in model.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def loss_curve(log: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log if "loss" in r]
    loss = [r["loss"] for r in log if "loss" in r]
    probes = [r for r in log if "probe" in r]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(steps, loss, lw=0.6, alpha=0.4, label="loss")
    window = max(1, len(loss) // 50)
    if len(loss) >= window:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax[0].plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    ax[0].set(xlabel="step", ylabel="contrastive loss", title=f"{model} training loss")
    ax[0].legend()
    for key in ("pair_seen", "pair_held_out", "colour", "shape"):
        ax[1].plot([r["step"] for r in probes], [r["probe"][key] for r in probes], "o-", label=key)
    ax[1].set(xlabel="step", ylabel="top-1", ylim=(0, 1), title="zero-shot probe (64 px)")
    ax[1].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train(recipe: Recipe, args: argparse.Namespace) -> dict:
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    rng = random.Random(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    pool_options = scenes_options("train", num_images=recipe.pool_size, seed=recipe.pool_seed)
    start = time.perf_counter()
    pixels, objects = scene_pool(pool_options, args.cache, recipe.threads)
    render_s = time.perf_counter() - start
    probe_pixels, probe_pairs = probe_set()

    model = open_clip.create_model(recipe.model, pretrained=None)
    tokenizer = open_clip.get_tokenizer(recipe.model)
    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    model.train()
    optimizer = torch.optim.AdamW(
        param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6
    )
    width, height = pool_options.image_size
    colours, shapes = pool_options.colours, pool_options.categories
    log: list[dict] = []
    args.log.parent.mkdir(parents=True, exist_ok=True)
    log_file = args.log.open("w")
    train_start = time.perf_counter()
    bar = tqdm(range(recipe.steps), desc=f"training {recipe.model}", unit="step", mininterval=5)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        index = torch.randint(len(pixels), (recipe.batch_size,), generator=gen)
        x = torch.from_numpy(pixels[index.numpy()]).permute(0, 3, 1, 2).float() / 255
        if recipe.flip:  # every shape is mirror-symmetric left-right; captions unchanged
            flip = torch.rand(recipe.batch_size, generator=gen) < 0.5
            x[flip] = x[flip].flip(-1)
        x = (x - mean) / std
        batch_objects = [objects[i] for i in index.tolist()]
        text_objects = list(batch_objects)
        if recipe.hard_negatives:
            negatives = [hard_negative(o, rng, colours, shapes) for o in batch_objects]
            text_objects += [n for n in negatives if n is not None]
        texts = [sample_caption(o, width * height, rng, recipe.size_words) for o in text_objects]
        image, text, scale = model(x, tokenizer(texts))[:3]
        logits = scale * image @ text.T  # [B, B + negatives]
        match = match_targets(batch_objects, text_objects)
        # image -> text over every caption (the hard negatives too); text -> image over
        # the true captions; scenes with the same objects share the probability
        i2t = F.cross_entropy(logits, match / match.sum(dim=1, keepdim=True))
        pos = match[:, : len(batch_objects)].T
        t2i = F.cross_entropy(logits[:, : len(batch_objects)].T, pos / pos.sum(dim=1, keepdim=True))
        loss = (i2t + t2i) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        record = {
            "step": step + 1,
            "loss": round(loss.item(), 4),
            "lr": lr_at(step, recipe),
            "logit_scale": round(scale.item(), 2),
            "seconds": round(time.perf_counter() - train_start, 1),
        }
        if (step + 1) % args.probe_every == 0 or step + 1 == recipe.steps:
            record["probe"] = probe(model, tokenizer, probe_pixels, probe_pairs, mean, std)
            tqdm.write(f"step {step + 1}: loss {record['loss']:.3f} probe {record['probe']}")
        log.append(record)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        bar.set_postfix(
            loss=f"{record['loss']:.3f}", scale=f"{record['logit_scale']:.1f}", refresh=False
        )
    train_s = time.perf_counter() - train_start
    log_file.close()
    model.eval()
    return {
        "model": model,
        "log": log,
        "render_seconds": render_s,
        "train_seconds": train_s,
        "final_probe": log[-1]["probe"],
        "final_loss": float(np.mean([r["loss"] for r in log[-50:]])),
    }


def render_note(seconds: float) -> str:
    """How the training scenes were obtained, for the card."""
    if seconds < 30:
        return "came from the render cache (rendering them takes minutes; see the log)"
    return f"took {seconds / 60:.1f} min to render"


def tower_text(model: torch.nn.Module, name: str):
    """The card's description of the image tower, and its grid at a given input side."""
    visual = model.visual
    config = f"`retrieval/model_configs/{name}.json`"
    if isinstance(visual, open_clip.modified_resnet.ModifiedResNet):
        text = (
            f"An open_clip CLIP with a ModifiedResNet image tower and attention pool ({config}), "
            "so Dense-CLIP and Cluster-CLIP apply to it exactly as to OpenAI's RN50."
        )
        return text, lambda side: f"{side // 32} x {side // 32} attention-pool grid"
    patch = visual.patch_size[0]
    blocks = len(visual.transformer.resblocks)
    text = (
        f"An open_clip CLIP with a ViT image tower ({config}: {patch} px patches, {blocks} "
        f"blocks of width {visual.transformer.width}, class-token pooling), so Dense-CLIP's "
        "last-block variants (MaskCLIP, SCLIP, ClearCLIP, NACLIP) apply to it as to OpenAI's "
        "ViT-B/16."
    )
    return text, lambda side: f"{side // patch} x {side // patch} patch grid"


def write_card(path: Path, recipe: Recipe, result: dict, weights: Path, curve: Path) -> None:
    model = result["model"]
    params = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.visual.parameters())
    probe_ = result["final_probe"]
    tower, grid = tower_text(model, recipe.model)
    card = f"""# {recipe.model}: a small CLIP trained on generated scenes

The model behind the offline benchmark (`configs/experiment/scenes_*.yaml`,
`tools/run_scenes_benchmark.py`). {tower} It knows 8 colours x 8 shapes
and nothing else: it is a test instrument, not a general model.

| | |
|---|---|
| file | `{weights.relative_to(ROOT) if weights.is_relative_to(ROOT) else weights}` \
({weights.stat().st_size / 2**20:.1f} MiB, fp16 safetensors, an open_clip state dict) |
| parameters | {params / 1e6:.2f} M ({vision / 1e6:.2f} M image tower; most of the rest is \
the 49,408-token embedding table of the CLIP BPE tokenizer) |
| input | 64 x 64 ({grid(64)}); Dense-CLIP reads 256 x 256 ({grid(256)} cells) |
| text | CLIP BPE tokenizer, context length {model.context_length} |

## Training data
`retrieval.data.synthetic` preset `train` ({recipe.pool_size:,} scenes, seed \
{recipe.pool_seed}): 64 x 64 images, muted gradient backgrounds with blobs, noise and \
distractor strokes, 1-4 objects of 8 shapes x 8 colours, areas log-uniform from 36 px \
to 45% of the image, JPEG q90. The 8 held-out pairs ({", ".join(HELD_OUT_PAIRS)}) are \
never drawn. Each scene is captioned on the fly: its objects in random order, one of \
{len(set(TEMPLATES))} templates ("a photo of a red circle, a small blue star and a \
green square."), size words (small / large) in half of the captions. Left-right flips.

## Recipe
`python tools/train_scenes_clip.py` (defaults = this recipe):
{recipe.steps} steps x batch {recipe.batch_size} ({recipe.steps * recipe.batch_size:,} \
samples, {recipe.steps * recipe.batch_size / recipe.pool_size:.1f} passes over the \
scenes); symmetric InfoNCE with soft targets for scenes holding the same objects, plus \
one hard-negative caption per scene (one shape or colour changed, or two objects' \
colours swapped; never a held-out pair) among the image's candidates;
AdamW (betas 0.9 / 0.98, weight decay {recipe.weight_decay} on weights only), lr \
{recipe.lr} after {recipe.warmup} warm-up steps, cosine to {recipe.min_lr}; learnable \
temperature (clamped at 100); seed {recipe.seed}, {recipe.threads} CPU threads.

Trained on {platform.processor() or platform.machine()} ({recipe.threads} threads, \
torch {torch.__version__}): {result["train_seconds"] / 60:.1f} min training \
({result["train_seconds"] / recipe.steps:.2f} s per step); the scenes \
{render_note(result["render_seconds"])}. Final loss (mean of the last 50 steps) \
{result["final_loss"]:.3f}.

![loss curve]({curve.name})

## Zero-shot probe (512 single-object 64 px scenes, "a photo of a {{pair}}.")
| pair, seen | pair, held out | colour | shape |
|---|---|---|---|
| {probe_["pair_seen"]:.3f} | {probe_["pair_held_out"]:.3f} | {probe_["colour"]:.3f} | \
{probe_["shape"]:.3f} |

<!-- benchmark -->
(benchmark not run yet: `python tools/run_scenes_benchmark.py --card`)
<!-- /benchmark -->

<!-- benchmark-random -->
(`python tools/run_scenes_benchmark.py --weights random --card`)
<!-- /benchmark-random -->

## Limits
Knows only its 64 colour-shape pairs, flat-coloured polygons, and backgrounds like the
generator's; a query outside that vocabulary gets an arbitrary embedding. Its BPE
table rows for every other token are untrained (random).
"""
    path.write_text(card)


def main(argv: Sequence[str] | None = None) -> None:
    defaults = Recipe()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field, value in asdict(defaults).items():
        flag = "--" + field.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(
                flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=value
            )
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="weights (.safetensors; default: the shipped file of --model, "
        + ", ".join(f"{m}: {p.name}" for m, p in WEIGHTS.items())
        + ")",
    )
    parser.add_argument(
        "--card",
        type=Path,
        default=None,
        help="write the model card here (the shipped one: the weights' name, .md)",
    )
    parser.add_argument("--log", type=Path, default=None, help="JSON lines (default: OUT.jsonl)")
    parser.add_argument("--curve", type=Path, default=None, help="PNG (default: OUT-loss.png)")
    parser.add_argument(
        "--cache",
        type=Path,
        default=ROOT / "data" / "scenes-train-cache",
        help="where the rendered training scenes are cached",
    )
    parser.add_argument("--probe-every", type=int, default=250)
    parser.add_argument(
        "--model-config",
        type=Path,
        default=None,
        help="register another open_clip model config (JSON) to try a variant",
    )
    args = parser.parse_args(argv)
    if args.model_config:
        open_clip.add_model_config(args.model_config)
    recipe = Recipe(**{f: getattr(args, f) for f in asdict(defaults)})
    if args.out is None:
        if recipe.model not in WEIGHTS:
            parser.error(f"--out is required for {recipe.model} (no shipped weights)")
        args.out = WEIGHTS[recipe.model]
    stem = args.out.with_suffix("")
    args.log = args.log or stem.with_name(stem.name + "-train.jsonl")
    args.curve = args.curve or stem.with_name(stem.name + "-loss.png")
    print(f"recipe: {json.dumps(asdict(recipe))}", flush=True)
    result = train(recipe, args)
    meta = {
        "recipe": json.dumps(asdict(recipe)),
        "model": recipe.model,
        "probe": json.dumps(result["final_probe"]),
    }
    save_weights(result["model"], args.out, meta)
    loss_curve(result["log"], args.curve, recipe.model)
    if args.card:
        write_card(args.card, recipe, result, args.out, args.curve)
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB), {args.curve}, "
        f"{args.log}" + (f", {args.card}" if args.card else "")
    )
    print(f"train {result['train_seconds'] / 60:.1f} min; probe {result['final_probe']}")


if __name__ == "__main__":
    main()
