"""What the framework and each retriever cost, measured side by side in one run.

1. Extraction: images/s of the full embed phase (DataLoader -> Lightning predict ->
   shard writer) against a plain loop calling the retriever's ``encode_images`` on the
   same pre-decoded batches.
2. Scoring: images/s of exact scoring from fp16 shards on disk (``score_store``)
   against a plain in-memory matmul + max of the same shapes.
3. Retrievers: ms/image of ``encode_images`` for ``clip``, ``dense_clip`` and
   ``cluster_clip`` (k-means k=10 as cluster_clip_km_rn50x64, agglomerative n_clusters=50
   as AG-F) with the same backbone, the same input resolution (``clip`` forced to
   Dense-CLIP's) and random weights from one seed, on the same pre-decoded batches already on
   the device, under ``torch.inference_mode``. Every round times each retriever once, in
   a rotating order, so load drift on a shared machine hits all of them alike; the median
   over the rounds after the warm-up ones counts. Goals: dense/global <= 1.05,
   cluster/dense <= 1.10. For a ResNet the same rounds also time the parts (trunk, each
   pooling head, each aggregation), which show where a missed goal goes and give a
   steadier ratio (``parts``) than whole passes whose noise exceeds the 5% at stake.

    python bench/bench_pipeline.py --images 256 --backbone RN50 --reps 196 --dim 1024
    python bench/bench_pipeline.py --phases retrievers --backbone RN50 --resolution 512 \
        --images 4 --batch 2 --repeats 6 --clock cpu --threads 1 --json out.json
    python bench/bench_pipeline.py --phases retrievers --backbone RN50x64 --resolution 448 \
        --images 512 --batch 64 --precision 16-mixed --accelerator gpu
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from retrieval.config import load_config
from retrieval.data.synthetic import make_synthetic_coco
from retrieval.engine.embedding import make_trainer
from retrieval.engine.loading import embed_loader
from retrieval.engine.module import EmbedModule
from retrieval.engine.settings import RunSettings
from retrieval.engine.writer import ShardWriter
from retrieval.factory import build_dataset, build_retriever, create_retriever
from retrieval.representatives import Representatives
from retrieval.retrievers.base import Retriever, max_cosine
from retrieval.retrievers.dense_features import (
    attnpool_output,
    attnpool_tokens,
    is_resnet,
    resnet_feature_map,
)
from retrieval.store import ShardStore, score_store

PHASES = ("extraction", "scoring", "retrievers")
# Lightning's precision names: "-mixed" runs under autocast, "-true" casts the weights.
MIXED = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
TRUE = {"16-true": torch.float16, "bf16-true": torch.bfloat16}
GOALS = {"dense": 1.05, "cluster": 1.10}
# wall: what a user waits. cpu: this process's CPU time, which other jobs on a shared
# machine move far less than wall time (use --threads 1: more threads add their
# spin-waits to it).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
# cluster_clip_km_rn50x64's and cluster_clip_agf_rn50x64's aggregations.
CLUSTER_VARIANTS = {
    "kmeans": {"method": "kmeans", "k": 10},
    "agglomerative": {"method": "agglomerative", "n_clusters": 50},
}


def pick_device(args: argparse.Namespace) -> torch.device:
    """CUDA unless ``--accelerator cpu`` or none is present (the Trainer's ``auto``)."""
    use_cuda = args.accelerator != "cpu" and torch.cuda.is_available()
    return torch.device("cuda" if use_cuda else "cpu")


def synchronize(device: torch.device) -> None:
    """Waits for queued kernels, so a wall-clock interval covers the work it launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def compute_mode(precision: str, device: torch.device) -> Iterator[None]:
    """``inference_mode`` plus autocast for a ``-mixed`` precision, as the Trainer runs."""
    dtype = MIXED.get(precision)
    with torch.inference_mode(), torch.autocast(device.type, dtype, enabled=dtype is not None):
        yield


def demo_config(args: argparse.Namespace, root: Path) -> DictConfig:
    """The demo run config on ``args.images`` freshly generated synthetic images."""
    ann, images = make_synthetic_coco(root / "data", num_images=args.images, seed=0)
    return load_config(
        "demo",
        [
            f"data.annotations={ann}",
            f"data.images={images}",
            f"run.output_dir={root / 'run'}",
            f"retriever.backbone={args.backbone}",
            f"loader.batch_size={args.batch}",
            f"loader.num_workers={args.workers}",
            f"trainer.accelerator={args.accelerator}",
            f"trainer.precision={args.precision}",
            "run.progress=false",
        ],
    )


def decoded_batches(
    cfg: DictConfig, transform: Callable, batch: int, device: torch.device, dtype: torch.dtype
) -> list[Tensor]:
    """Every image decoded and transformed once, batched and moved to the device up front,
    so the timed loops measure the model only."""
    dataset = build_dataset(cfg, transform)
    return [
        dataset.collate([dataset[i] for i in range(s, min(s + batch, len(dataset)))])["pixels"]
        .to(device)
        .to(dtype)
        for s in range(0, len(dataset), batch)
    ]


def bench_extraction(args: argparse.Namespace, cfg: DictConfig) -> tuple[float, float]:
    retriever = build_retriever(cfg)
    device = pick_device(args)
    dtype = TRUE.get(args.precision, torch.float32)
    cpu = torch.device("cpu")
    batches = decoded_batches(cfg, retriever.image_transform, args.batch, cpu, torch.float32)
    model = retriever.to(device=device, dtype=dtype).eval()
    start = time.perf_counter()
    with compute_mode(args.precision, device):
        for pixels in batches:  # the copy to the device counts, as in the Trainer
            model.encode_images(pixels.to(device, dtype, non_blocking=True)).to("cpu")
    synchronize(device)
    plain = args.images / (time.perf_counter() - start)

    dataset = build_dataset(cfg, None)
    store = ShardStore(Path(cfg.run.output_dir) / "embeddings")
    trainer = make_trainer(
        RunSettings.of(cfg).trainer, ShardWriter(store, cfg.store.shard_size), progress=False
    )
    loader = embed_loader(
        dataset, retriever.image_transform, dataset.image_ids, args.batch, args.workers
    )
    start = time.perf_counter()
    trainer.predict(EmbedModule(retriever), loader, return_predictions=False)
    framework = args.images / (time.perf_counter() - start)
    return framework, plain


def bench_scoring(args: argparse.Namespace, root: Path) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    store = ShardStore(root / "scoring")
    per_shard = 1024
    for s in range(0, args.score_images, per_shard):
        n = min(per_shard, args.score_images - s)
        emb = F.normalize(torch.randn(n, args.reps, args.dim, generator=g), dim=-1)
        store.write_shard(f"s{s:08d}", torch.arange(s, s + n), Representatives.dense(emb))
    text = F.normalize(torch.randn(args.queries, args.dim, generator=g), dim=-1)
    device = pick_device(args).type

    start = time.perf_counter()
    score_store(store, text, max_cosine, device, args.max_memory_gb)
    framework = args.score_images / (time.perf_counter() - start)

    emb = torch.cat([s.reps.embeddings for s in store.iter_shards()]).to(device)
    t = text.to(device)
    start = time.perf_counter()
    step = max(1, int(args.max_memory_gb * 2**30 // (args.queries * args.reps * 4)))
    for i in range(0, len(emb), step):
        (emb[i : i + step].float() @ t.T).amax(dim=1)
    synchronize(torch.device(device))
    plain = args.score_images / (time.perf_counter() - start)
    return framework, plain


def interleaved_rounds(
    candidates: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Seconds per call of each candidate in each of ``repeats`` rounds after ``warmup``,
    and each candidate's last result.

    Each round calls every candidate once, starting one later than the round before, so
    a slow spell of a shared machine does not land on one candidate only.
    """
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    last: dict[str, object] = {}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = clock()
            last[name] = candidates[name]()
            synchronize(device)
            if round_ >= warmup:
                times[name].append(clock() - start)
    return times, last


def build_retrievers(args: argparse.Namespace) -> dict[str, Retriever]:
    """``clip``, ``dense_clip`` and the ``cluster_clip`` variants: same backbone, same input
    side, random weights from the same seed (identical for the dense-based ones; ``clip``'s
    differ from where its pool's positional table, sized for the input, takes another shape).
    """
    common = {"backbone": args.backbone, "pretrained": None}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        torch.manual_seed(0)
        dense = create_retriever("dense_clip", resolution=args.resolution, **common)
        torch.manual_seed(0)
        retrievers = {"clip": create_retriever("clip", resolution=dense.resolution, **common)}
        retrievers["dense"] = dense
        for key, aggregate in CLUSTER_VARIANTS.items():
            torch.manual_seed(0)
            retrievers[key] = create_retriever(
                "cluster_clip", resolution=dense.resolution, aggregate=aggregate, **common
            )
    return retrievers


def describe(key: str) -> str:
    """Table label: the retriever and, for Cluster-CLIP, its aggregation."""
    if key in CLUSTER_VARIANTS:
        options = [f"{k}={v}" for k, v in CLUSTER_VARIANTS[key].items() if k != "method"]
        return " ".join(["cluster_clip", key, *options])
    return {"clip": "clip (global)", "dense": "dense_clip"}[key]


def pooling_parts(
    retrievers: dict[str, Retriever], batches: list[Tensor]
) -> dict[str, tuple[str, Callable[[], object]]]:
    """The ResNet pipeline cut into its parts: id -> (label, callable over all batches).

    The heads and aggregations run on feature maps / dense outputs computed once up
    front, so each part is timed alone; ``trunk`` is the ResNet up to ``layer4`` that all
    retrievers share. The dense head mirrors ``resnet_dense_features`` (positional=False):
    its first part only serves the global embedding, the second makes the cells.
    """
    clip, dense = retrievers["clip"], retrievers["dense"]
    visual = dense.model.visual
    pool = visual.attnpool
    features = [resnet_feature_map(visual, pixels) for pixels in batches]
    outputs = [dense.encode_dense(pixels) for pixels in batches]
    tokens = features[0].shape[-2] * features[0].shape[-1] + 1

    def global_query(f: Tensor) -> Tensor:
        t = attnpool_tokens(pool, f)
        return attnpool_output(pool, t, pool.v_proj(t))

    def cells(f: Tensor) -> Tensor:
        return pool.c_proj(pool.v_proj(f.flatten(2).transpose(1, 2)))

    parts = {
        "trunk": (
            "trunk (shared ResNet up to layer4)",
            lambda: [resnet_feature_map(visual, p) for p in batches],
        ),
        "clip_head": (
            f"clip head: open_clip attnpool, {tokens} queries",
            lambda: [clip.model.visual.attnpool(f) for f in features],
        ),
        "dense_global": (
            "dense head: tokens + v_proj + 1-query attention",
            lambda: [global_query(f) for f in features],
        ),
        "dense_cells": (
            f"dense head: v_proj + c_proj of {tokens - 1} cells",
            lambda: [cells(f) for f in features],
        ),
    }
    for key in CLUSTER_VARIANTS:
        aggregate = retrievers[key].aggregate_dense
        parts[key + "_aggregate"] = (
            f"aggregate: {key}",
            lambda a=aggregate: [a(out) for out in outputs],
        )
    return parts


def from_parts(ms: dict[str, float]) -> dict[str, float]:
    """Each retriever's ms/image as the sum of its parts: a steadier estimate than the
    whole passes on a shared machine, since the parts that differ are short and timed in
    the same rounds (it leaves out the normalisation and boxes, well under 1 ms/image)."""
    dense = ms["trunk"] + ms["dense_global"] + ms["dense_cells"]
    return {
        "clip": ms["trunk"] + ms["clip_head"],
        "dense": dense,
        **{key: dense + ms[key + "_aggregate"] for key in CLUSTER_VARIANTS},
    }


def bench_retrievers(args: argparse.Namespace, cfg: DictConfig) -> dict[str, Any]:
    """ms/image of each retriever (and of each part, for a ResNet) and the goal ratios."""
    device = pick_device(args)
    dtype = TRUE.get(args.precision, torch.float32)
    retrievers = {
        key: r.to(device=device, dtype=dtype).eval() for key, r in build_retrievers(args).items()
    }
    dense = retrievers["dense"]
    batches = decoded_batches(cfg, dense.image_transform, args.batch, device, dtype)
    with compute_mode(args.precision, device):
        candidates: dict[str, Callable[[], object]] = {
            key: lambda r=r: [r.encode_images(p) for p in batches] for key, r in retrievers.items()
        }
        parts = pooling_parts(retrievers, batches) if is_resnet(dense.model.visual) else {}
        candidates.update({key: fn for key, (_, fn) in parts.items()})
        clock = CLOCKS[args.clock]
        times, last = interleaved_rounds(candidates, args.warmup, args.repeats, device, clock)
    ms = {key: 1000 * statistics.median(t) / args.images for key, t in times.items()}
    best = {key: 1000 * min(t) / args.images for key, t in times.items()}
    summed = from_parts(ms) if parts else {}
    rows = [
        {
            "name": describe(key),
            "ms_per_image": ms[key],
            "min_ms_per_image": best[key],
            "parts_ms_per_image": summed.get(key),
            "reps_per_image": torch.cat([reps.counts for reps in last[key]]).float().mean().item(),
            "round_s": times[key],
        }
        for key in retrievers
    ]
    pairs = [("dense_clip / clip", "dense", "clip", GOALS["dense"])] + [
        (f"{describe(key)} / dense_clip", key, "dense", GOALS["cluster"])
        for key in CLUSTER_VARIANTS
    ]
    ratios = [
        {
            "name": name,
            "ratio": ms[num] / ms[den],
            "ratio_of_minima": best[num] / best[den],
            "ratio_from_parts": summed[num] / summed[den] if summed else None,
            "goal": goal,
            "met": ms[num] / ms[den] <= goal,
        }
        for name, num, den, goal in pairs
    ]
    return {
        "backbone": args.backbone,
        "resolution": dense.resolution,
        "rows": rows,
        "ratios": ratios,
        "parts": [
            {
                "name": label,
                "ms_per_image": ms[key],
                "x_dense": ms[key] / ms["dense"],
                "round_s": times[key],
            }
            for key, (label, _) in parts.items()
        ],
    }


def cell(value: float | None, spec: str) -> str:
    """A table cell: the formatted number, or ``-`` where there is none (no breakdown)."""
    return "-" if value is None else format(value, spec)


def print_retrievers(result: dict[str, Any], args: argparse.Namespace) -> None:
    side = result["resolution"]
    print(
        f"\nretrievers: {result['backbone']} @ {side}x{side}, random weights, "
        f"{args.images} images in batches of {args.batch}, {args.precision}, median of "
        f"{args.repeats} interleaved rounds after {args.warmup} warm-up, {args.clock} clock"
    )
    columns = f"{'median':>10}{'min':>10}{'parts':>10}"
    print(f"{'retriever (ms/image)':<52}{columns}{'reps/img':>10}")
    for row in result["rows"]:
        print(
            f"{row['name']:<52}{row['ms_per_image']:>10.1f}{row['min_ms_per_image']:>10.1f}"
            f"{cell(row['parts_ms_per_image'], '.1f'):>10}{row['reps_per_image']:>10.1f}"
        )
    print(f"{'ratio (met: median <= goal)':<52}{columns}{'goal':>8}{'met':>5}")
    for r in result["ratios"]:
        print(
            f"{r['name']:<52}{r['ratio']:>10.3f}{r['ratio_of_minima']:>10.3f}"
            f"{cell(r['ratio_from_parts'], '.3f'):>10}{'<=' + format(r['goal'], '.2f'):>8}"
            f"{'yes' if r['met'] else 'NO':>5}"
        )
    if result["parts"]:
        print(f"{'part (same rounds)':<52}{'median':>10}{'x dense':>10}")
        for p in result["parts"]:
            print(f"{p['name']:<52}{p['ms_per_image']:>10.1f}{p['x_dense']:>10.3f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backbone", default="RN-tiny")
    parser.add_argument(
        "--resolution", type=int, default=None, help="retrievers: input side (Dense-CLIP's)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="retrievers: untimed rounds")
    parser.add_argument("--repeats", type=int, default=5, help="retrievers: timed rounds")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="retrievers: wall or CPU time"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", choices=["32-true", *MIXED, *TRUE], default="32-true")
    parser.add_argument("--score-images", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=196)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=80)
    parser.add_argument("--max-memory-gb", type=float, default=1.0)
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and pick_device(args).type == "cuda":
        parser.error("--clock cpu times the host only; on a GPU use --clock wall")
    if args.threads:
        torch.set_num_threads(args.threads)

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = demo_config(args, root)
        if "extraction" in args.phases:
            results["extraction"] = bench_extraction(args, cfg)
        if "scoring" in args.phases:
            results["scoring"] = bench_scoring(args, root)
        if "retrievers" in args.phases:
            results["retrievers"] = bench_retrievers(args, cfg)

    device = torch.cuda.get_device_name() if pick_device(args).type == "cuda" else "CPU"
    print(f"device: {device}, torch threads: {torch.get_num_threads()}")
    labels = {
        "extraction": f"extraction {args.backbone} x{args.images} b{args.batch} {args.precision}",
        "scoring": f"scoring {args.score_images} img x {args.reps} reps x {args.dim}d, "
        f"{args.queries} q",
    }
    overhead = [key for key in labels if key in results]
    if overhead:
        print(f"{'phase':<44}{'framework img/s':>16}{'plain img/s':>14}{'ratio':>8}")
    for key in overhead:
        framework, plain = results[key]
        print(f"{labels[key]:<44}{framework:>16.1f}{plain:>14.1f}{framework / plain:>8.2f}")
        results[key] = {"framework_img_s": framework, "plain_img_s": plain}
    if "retrievers" in results:
        print_retrievers(results["retrievers"], args)

    argv = sys.argv[1:] if argv is None else argv
    report = {
        "command": shlex.join(["python", "bench/bench_pipeline.py", *argv]),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
