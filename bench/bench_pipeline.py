"""What the framework costs over the bare computation, measured side by side in one run.

1. Extraction: images/s of the full embed phase (DataLoader -> Lightning predict ->
   shard writer) against a plain loop calling the retriever's ``encode_images`` on the
   same pre-decoded batches.
2. Scoring: images/s of exact scoring from fp16 shards on disk (``score_store``)
   against a plain in-memory matmul + max of the same shapes.

    python bench/bench_pipeline.py --images 256 --backbone RN50 --reps 196 --dim 1024
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from retrieval.config import load_config
from retrieval.factory import build_retriever
from retrieval.data.synthetic import make_synthetic_coco
from retrieval.engine.embedding import make_trainer
from retrieval.factory import build_dataset
from retrieval.engine.module import EmbedModule
from retrieval.engine.writer import ShardWriter
from retrieval.representatives import Representatives
from retrieval.retrievers.base import max_cosine
from retrieval.store import ShardStore, score_store


def bench_extraction(args: argparse.Namespace, root: Path) -> tuple[float, float]:
    ann, images = make_synthetic_coco(root / "data", num_images=args.images, seed=0)
    cfg = load_config(
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
    retriever = build_retriever(cfg)
    dataset = build_dataset(cfg, retriever.image_transform)
    batches = [
        dataset.collate([dataset[i] for i in range(s, min(s + args.batch, len(dataset)))])
        for s in range(0, len(dataset), args.batch)
    ]
    device = torch.device(
        "cuda" if args.accelerator != "cpu" and torch.cuda.is_available() else "cpu"
    )
    model = retriever.to(device).eval()
    dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(args.precision)
    start = time.perf_counter()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    with torch.inference_mode(), autocast:
        for batch in batches:
            model.encode_images(batch["pixels"].to(device, non_blocking=True)).to("cpu")
    if device.type == "cuda":
        torch.cuda.synchronize()
    plain = args.images / (time.perf_counter() - start)

    store = ShardStore(root / "run" / "embeddings")
    trainer = make_trainer(cfg, ShardWriter(store, cfg.store.shard_size))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch, num_workers=args.workers, collate_fn=dataset.collate
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
    device = "cuda" if torch.cuda.is_available() and args.accelerator != "cpu" else "cpu"

    start = time.perf_counter()
    score_store(store, text, max_cosine, device, args.max_memory_gb)
    framework = args.score_images / (time.perf_counter() - start)

    emb = torch.cat([s.reps.embeddings for s in store.iter_shards()]).to(device)
    t = text.to(device)
    start = time.perf_counter()
    step = max(1, int(args.max_memory_gb * 2**30 // (args.queries * args.reps * 4)))
    for i in range(0, len(emb), step):
        (emb[i : i + step].float() @ t.T).amax(dim=1)
    if device == "cuda":
        torch.cuda.synchronize()
    plain = args.score_images / (time.perf_counter() - start)
    return framework, plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backbone", default="RN-tiny")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--score-images", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=196)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=80)
    parser.add_argument("--max-memory-gb", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ext = bench_extraction(args, root)
        sco = bench_scoring(args, root)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {device}, torch threads: {torch.get_num_threads()}")
    print(f"{'phase':<44}{'framework img/s':>16}{'plain img/s':>14}{'ratio':>8}")
    rows = [
        (f"extraction {args.backbone} x{args.images} b{args.batch} {args.precision}", ext),
        (
            f"scoring {args.score_images} img x {args.reps} reps x {args.dim}d, {args.queries} q",
            sco,
        ),
    ]
    for name, (framework, plain) in rows:
        print(f"{name:<44}{framework:>16.1f}{plain:>14.1f}{framework / plain:>8.2f}")


if __name__ == "__main__":
    main()
