"""What each Dense-CLIP last-block variant costs next to global CLIP, side by side in one run.

For each backbone (an open_clip ViT and a SigLIP tower, random weights: the same compute as
pretrained ones), the model is built at the given resolution, so global CLIP
(``encode_image``) and Dense-CLIP (``dense_features`` without the global embedding, one
variant of ``retriever.dense_attention`` each) read the same input on the same weights.
Every round times each candidate once over the same pre-made batches, in a rotating order,
so load drift on a shared machine hits all of them alike; the median of the rounds after
the warm-up ones counts. Goal: variant / global <= 1.05.

The same rounds also time the parts: the trunk the candidates share (every block but the
last) and each head (the last block as trained + open_clip's pooling for global CLIP; the
variant's last block + the projection of every patch for Dense-CLIP). ``parts`` is the
ratio of trunk + head sums, steadier than whole passes whose noise on a shared machine
exceeds the 5% at stake.

    python bench/bench_dense_attention.py --backbones ViT-B-16 ViT-B-16-SigLIP \
        --resolution 224 --images 2 --batch 2 --repeats 6 --clock cpu --threads 1 \
        --json results/bench/dense_attention_cpu.json
    python bench/bench_dense_attention.py --backbones ViT-B-16 ViT-L-14-336 \
        ViT-B-16-SigLIP2-256 --resolution 448 --images 64 --batch 32 --device cuda --clock wall
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retrieval.retrievers import openclip_loader  # noqa: F401  (registers the tiny configs)
from retrieval.retrievers.dense_features import dense_features, vit_pool, vit_tokens
from retrieval.retrievers.siglip_features import (
    is_siglip,
    map_value_path,
    siglip_tokens,
)
from retrieval.retrievers.vit_attention import (
    DENSE_ATTENTIONS,
    VARIANTS,
    open_clip_parts,
    run_last_block,
    timm_parts,
)

GOAL = 1.05
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
Fn = Callable[[Tensor], Any]


def heads(model: nn.Module) -> tuple[Fn, Fn, dict[str, Fn]]:
    """The shared trunk (pixels -> last block input), the global head and each variant's
    head (last block input -> embeddings), for an open_clip ViT or a SigLIP tower."""
    visual = model.visual
    if is_siglip(visual):
        trunk = visual.trunk
        last = trunk.blocks[-1]
        prefix = trunk.num_prefix_tokens

        def siglip_trunk(pixels: Tensor) -> Tensor:
            x, _ = siglip_tokens(trunk, pixels)
            return trunk.blocks[:-1](x)

        def siglip_global(x: Tensor) -> Tensor:
            return visual.head(trunk.forward_head(trunk.norm(last(x))))

        def siglip_variant(name: str) -> Fn:
            spec = VARIANTS[name] if name != "maskclip" else None

            def run(x: Tensor) -> Tensor:
                side = int((x.shape[1] - prefix) ** 0.5)
                y = (
                    last(x)
                    if spec is None
                    else run_last_block(timm_parts(last), x, spec, (side, side), prefix)
                )
                return map_value_path(visual, trunk.norm(y)[:, prefix:])

            return run

        return siglip_trunk, siglip_global, {v: siglip_variant(v) for v in DENSE_ATTENTIONS}

    blocks = visual.transformer.resblocks

    def vit_trunk(pixels: Tensor) -> Tensor:
        x, _ = vit_tokens(visual, pixels)
        for block in blocks[:-1]:
            x = block(x)
        return x

    def vit_global(x: Tensor) -> Tensor:
        return vit_pool(visual, blocks[-1](x))

    def vit_variant(name: str) -> Fn:
        def run(x: Tensor) -> Tensor:
            side = int((x.shape[1] - 1) ** 0.5)
            y = run_last_block(open_clip_parts(blocks[-1]), x, VARIANTS[name], (side, side), 1)
            return visual.ln_post(y[:, 1:]) @ visual.proj

        return run

    return vit_trunk, vit_global, {v: vit_variant(v) for v in DENSE_ATTENTIONS}


def bench_backbone(backbone: str, args: argparse.Namespace) -> dict[str, Any]:
    """Median ms/image of each candidate and part over interleaved rounds."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(
            backbone, pretrained=None, force_image_size=args.resolution
        ).eval()
    device = torch.device(args.device)
    model = model.to(device)
    visual = model.visual
    side = args.resolution
    batches = [
        torch.randn(min(args.batch, args.images - i), 3, side, side, device=device)
        for i in range(0, args.images, args.batch)
    ]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    whole: dict[str, Fn] = {"clip (global)": model.encode_image}
    for name in DENSE_ATTENTIONS:
        whole[f"dense_clip {name}"] = lambda p, name=name: dense_features(
            visual, p, with_global=False, attention=name
        )
    trunk, global_head, variant_heads = heads(model)
    inputs = [trunk(b) for b in batches]
    parts: dict[str, tuple[Fn, list[Tensor]]] = {
        "trunk (every block but the last)": (trunk, batches),
        "head: clip (last block + pool)": (global_head, inputs),
    }
    for name, fn in variant_heads.items():
        parts[f"head: {name}"] = (fn, inputs)
    candidates = [(k, fn, batches) for k, fn in whole.items()]
    candidates += [(k, fn, data) for k, (fn, data) in parts.items()]
    clock = CLOCKS[args.clock]
    times: dict[str, list[float]] = {name: [] for name, _, _ in candidates}
    with torch.inference_mode():
        for round_ in range(args.warmup + args.repeats):
            shift = round_ % len(candidates)
            for name, fn, data in candidates[shift:] + candidates[:shift]:
                sync()
                start = clock()
                for batch in data:
                    fn(batch)
                sync()
                if round_ >= args.warmup:
                    times[name].append((clock() - start) * 1000 / args.images)
    median = {k: statistics.median(v) for k, v in times.items()}
    fastest = {k: min(v) for k, v in times.items()}
    trunk_ms = median["trunk (every block but the last)"]
    global_parts = trunk_ms + median["head: clip (last block + pool)"]
    ratios = {
        name: {
            "median": median[f"dense_clip {name}"] / median["clip (global)"],
            "min": fastest[f"dense_clip {name}"] / fastest["clip (global)"],
            "parts": (trunk_ms + median[f"head: {name}"]) / global_parts,
        }
        for name in DENSE_ATTENTIONS
    }
    grid = side // (
        visual.trunk.patch_embed.patch_size[0] if is_siglip(visual) else visual.patch_size[0]
    )
    return {
        "backbone": backbone,
        "resolution": side,
        "grid": [grid, grid],
        "ms_per_image": {"median": median, "min": fastest},
        "ratios": ratios,
    }


def report(result: dict[str, Any], args: argparse.Namespace) -> str:
    r, g = result["resolution"], result["grid"]
    lines = [
        f"{result['backbone']} @ {r}x{r} ({g[0]} x {g[1]} patches), random weights, "
        f"{args.images} images in batches of {args.batch}, median of {args.repeats} "
        f"interleaved rounds after {args.warmup} warm-up, {args.clock} clock",
        f"{'candidate (ms/image)':45s} {'median':>9s} {'min':>9s}",
    ]
    for name, ms in result["ms_per_image"]["median"].items():
        lines.append(f"{name:45s} {ms:9.1f} {result['ms_per_image']['min'][name]:9.1f}")
    lines.append(f"{'ratio to clip':45s} {'median':>9s} {'min':>9s} {'parts':>9s}  goal  met")
    for name, ratio in result["ratios"].items():
        met = "yes" if ratio["median"] <= GOAL else "NO"
        lines.append(
            f"{'dense_clip ' + name:45s} {ratio['median']:9.3f} {ratio['min']:9.3f} "
            f"{ratio['parts']:9.3f}  <={GOAL}  {met}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["ViT-B-16", "ViT-B-16-SigLIP"])
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (use --clock wall)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"device: {args.device}, torch threads: {threads}, torch {torch.__version__}")
    results = []
    for backbone in args.backbones:
        result = bench_backbone(backbone, args)
        print(report(result, args), flush=True)
        results.append(result)
    if args.json:
        meta = {"args": vars(args) | {"json": str(args.json)}, "machine": platform.processor()}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
