"""What ``retrieval embed`` over a folder costs, measured side by side in one run.

The two "Performance" goals of issue 16 about the ``folder`` dataset:

1. Embed: images/s of the whole embed phase over a folder of generated photo-like JPEGs
   (``build_dataset`` with ``dataset=folder``: listing, ids, header reads and the
   collection table; then ``retrieval.engine.embed``: DataLoader with the configured
   workers, Lightning predict, shard writer) against a plain loop over the same files
   (``rglob`` listing, PIL open + the retriever's own ``image_transform`` +
   ``encode_images`` in batches of the same size, in this process), with the same
   retriever object (built once, outside the timing), the same torch threads. Goal:
   framework / plain >= 0.9. Every round runs both, in a rotating order, each framework
   round into an emptied run folder (so it embeds every image); the median over the
   rounds after the warm-up ones counts. Listing is timed inside each side and reported
   apart too. The same rounds also time the framework with ``loader.num_workers`` set to
   ``--compare-workers`` (default 0), which shows what the loader workers cost.
2. Listing: a folder of ``--files`` empty ``.jpg`` files spread over ``--subfolders``
   folders, listed by the ``folder`` dataset (``FolderDataset``: ``os.scandir`` walk, id
   assignment, header reads, ``images.parquet`` written) in a fresh subprocess that
   reports its peak RSS increase (``VmHWM`` at the end minus the RSS right before, after
   every import and with the peak mark reset there). Goal: < 300 MB, and a progress bar
   past 10,000 items. It runs twice: ``first`` (a new run folder: every file new, every
   header read) and ``rerun`` (the same run folder: every file known, no header read).

Clocks: ``wall`` is what a user waits; ``cpu`` is the CPU time of this process plus its
finished children (the DataLoader workers are joined at the end of each pass, so their
decoding counts too), which other people's jobs on a shared machine move far less than
wall time. Both are recorded every round; ``--clock`` picks the one the goal is judged
on. Use ``--threads 1`` with ``--clock cpu`` (more threads add their spin-waits to it).

    python bench/bench_embed_folder.py --images 256 --files 1000000
    python bench/bench_embed_folder.py --images 256 --repeats 5 --clock cpu --threads 1 \\
        --files 1000000 --tmp /dev/shm --json results/bench/embed_folder_cpu.json \\
        --md results/bench/embed_folder_cpu.md
    python bench/bench_embed_folder.py --parts embed --backbones RN50 --images 32
    python bench/bench_embed_folder.py --parts webdataset --images 256 --shards 4 \\
        --clock cpu --threads 1 --tmp /dev/shm

3. Webdataset (``--parts webdataset``, not in the default parts): the same generated JPEGs
   packed into ``--shards`` plain tar shards (``tarfile``, members ``000123.jpg`` in
   listing order, spread evenly), and ``retrieval.engine.embed`` timed over
   ``dataset=webdataset data.shards=<dir>/{000000..N}.tar`` against ``dataset=folder``
   over the files, interleaved in the same rounds, with the same retriever, batch size,
   loader workers and torch threads, each into an emptied run folder. Goal: streaming is
   no slower than the folder, webdataset / folder images/s >= 1.0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

PARTS = ("embed", "listing", "webdataset")
DEFAULT_PARTS = ("embed", "listing")
EMBED_GOAL = 0.9  # framework images/s >= 0.9 x the plain loop's
STREAM_GOAL = 1.0  # webdataset (streamed from tar shards) images/s >= the folder's
MEMORY_GOAL_MB = 300.0  # listing a 10^6-file folder stays under this
CLOCKS = ("wall", "cpu")
EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MB = 2**20


# clocks -------------------------------------------------------------------------------
def now() -> dict[str, float]:
    """Both clocks at once: wall seconds, and CPU seconds of this process plus its
    children that have been waited for (DataLoader workers, once joined)."""
    t = os.times()  # its user/system fields tick at 10 ms: a tiny test run read 0 s
    return {
        "wall": time.perf_counter(),
        "cpu": time.process_time() + t.children_user + t.children_system,
        "children_cpu": t.children_user + t.children_system,
    }


def since(start: dict[str, float]) -> dict[str, float]:
    end = now()
    return {clock: end[clock] - start[clock] for clock in start}


# 1. embed -----------------------------------------------------------------------------
def make_photos(folder: Path, count: int, width: int, height: int, seed: int = 0) -> float:
    """``count`` photo-like JPEGs (smooth colour field + sensor noise + a few filled
    shapes, quality 90) in subfolders of 100; returns their mean size in bytes."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
        noise = rng.normal(0.0, 10.0, (height, width, 3)).astype(np.float32)
        pixels = np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 8))):
            x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
            box = (
                x0,
                y0,
                x0 + int(rng.integers(20, width // 2)),
                y0 + int(rng.integers(20, height // 2)),
            )
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        path = folder / f"album_{i // 100:03d}" / f"IMG_{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
        total += path.stat().st_size
    return total / max(count, 1)


def embed_config(
    args: argparse.Namespace, backbone: str, data: list[str], run_dir: Path, workers: int
) -> Any:
    """The run config of one embed pass; ``data`` picks the dataset (``dataset=folder``
    plus its keys)."""
    from retrieval.config import load_config

    return load_config(
        "demo",
        [
            *data,
            f"run.output_dir={run_dir}",
            f"retriever.backbone={backbone}",
            "retriever.pretrained=null",
            f"loader.batch_size={args.batch}",
            f"loader.num_workers={workers}",
            "trainer.accelerator=cpu",
            f"run.progress={str(args.progress).lower()}",
        ],
    )


def folder_data(images: Path) -> list[str]:
    return ["dataset=folder", f"data.images={images}"]


def measure(
    candidates: dict[str, Callable[[], dict[str, dict[str, float]]]], args: argparse.Namespace
) -> dict[str, list[dict[str, dict[str, float]]]]:
    """:func:`rounds` of the candidates, refusing a run whose torch thread count moved."""
    threads = torch.get_num_threads()
    times = rounds(candidates, args.warmup, args.repeats)
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"torch threads changed from {threads} to {torch.get_num_threads()}")
    return times


def per_clock(
    times: dict[str, list[dict[str, dict[str, float]]]],
    images: int,
    baseline: str,
    compared: Iterable[str],
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per clock and candidate: median img/s, listing time and every round's seconds;
    each ``compared`` candidate also gets its ratio to ``baseline`` (median and the
    range over rounds)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for clock in CLOCKS:
        seconds = {name: [t["total"][clock] for t in times[name]] for name in times}
        out[clock] = {
            name: {
                "img_s": images / statistics.median(seconds[name]),
                "listing_s": statistics.median(t["listing"][clock] for t in times[name]),
                "seconds": seconds[name],
            }
            for name in times
        }
        for name in compared:
            per_round = [b / c for b, c in zip(seconds[baseline], seconds[name], strict=True)]
            out[clock][name].update(
                ratio=out[clock][name]["img_s"] / out[clock][baseline]["img_s"],
                ratio_min_round=min(per_round),
                ratio_max_round=max(per_round),
            )
    return out


def framework_pass(cfg: Any, retriever: Any, expected: int) -> dict[str, dict[str, float]]:
    """The embed phase as ``retrieval embed`` runs it, on an emptied run folder; the
    retriever is built already (its one-time build is not timed)."""
    from retrieval.engine import embed
    from retrieval.engine.parts import RunParts
    from retrieval.factory import build_dataset

    shutil.rmtree(cfg.run.output_dir, ignore_errors=True)
    start = now()
    dataset = build_dataset(cfg, None)  # embed's loader applies the transform
    listing = since(start)
    result = embed(cfg, RunParts(retriever, dataset))
    total = since(start)
    if result.embedded != expected:
        raise RuntimeError(f"embed embedded {result.embedded} images, expected {expected}")
    return {"total": total, "listing": listing}


def plain_pass(
    root: Path, retriever: Any, batch: int, keep: dict[str, torch.Tensor] | None = None
) -> dict[str, dict[str, float]]:
    """The loop a user would write: list, then open + transform + encode in batches."""
    start = now()
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    listing = since(start)
    transform = retriever.image_transform
    with torch.inference_mode():
        for s in range(0, len(paths), batch):
            chunk = paths[s : s + batch]
            pixels = []
            for path in chunk:
                with Image.open(path) as image:
                    pixels.append(transform(image.convert("RGB")))
            reps = retriever.encode_images(torch.stack(pixels)).to("cpu")
            if keep is not None:
                for path, emb in zip(chunk, reps.embeddings, strict=True):
                    keep[path.relative_to(root).as_posix()] = emb
    return {"total": since(start), "listing": listing}


def rounds(
    candidates: dict[str, Callable[[], dict[str, dict[str, float]]]], warmup: int, repeats: int
) -> dict[str, list[dict[str, dict[str, float]]]]:
    """Each candidate's timings in each round after ``warmup``; every round calls each
    candidate once, starting one later than the round before, so a slow spell of a shared
    machine does not land on one candidate only."""
    names = list(candidates)
    out: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            timing = candidates[name]()
            if round_ >= warmup:
                out[name].append(timing)
    return out


def stored_vs_plain(run_dir: Path, plain: dict[str, torch.Tensor]) -> float:
    """Largest |difference| between the run's stored (fp16) embeddings and the plain
    loop's, matched by path: both sides ran the same model on the same pixels."""
    from retrieval.data.collection import read_collection
    from retrieval.store import ShardStore

    table = read_collection(run_dir)
    path_of = dict(
        zip(table.column("image_id").to_pylist(), table.column("path").to_pylist(), strict=True)
    )
    worst = 0.0
    for shard in ShardStore(run_dir / "embeddings").iter_shards():
        for image_id, emb in zip(shard.image_ids.tolist(), shard.reps.embeddings, strict=True):
            theirs = plain[path_of[image_id]]
            worst = max(worst, float((emb.float() - theirs.float()).abs().max()))
    return worst


def bench_embed(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from retrieval.factory import build_retriever

    images = root / "photos"
    start = time.perf_counter()
    mean_bytes = make_photos(images, args.images, args.width, args.height)
    generate_s = time.perf_counter() - start
    variants = {"framework": args.workers}
    if args.compare_workers >= 0 and args.compare_workers != args.workers:
        variants[f"framework_workers{args.compare_workers}"] = args.compare_workers
    rows = []
    for backbone in args.backbones:
        configs = {
            name: embed_config(
                args, backbone, folder_data(images), root / f"run-{backbone}-{name}", workers
            )
            for name, workers in variants.items()
        }
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
            retriever = build_retriever(configs["framework"]).eval()
        candidates: dict[str, Callable[[], dict[str, dict[str, float]]]] = {
            name: lambda c=cfg, r=retriever: framework_pass(c, r, args.images)
            for name, cfg in configs.items()
        }
        candidates["plain"] = lambda r=retriever: plain_pass(images, r, args.batch)
        times = measure(candidates, args)
        kept: dict[str, torch.Tensor] = {}
        plain_pass(images, retriever, args.batch, kept)
        row: dict[str, Any] = {
            "backbone": backbone,
            "input": list(
                retriever.image_transform(Image.new("RGB", (args.width, args.height))).shape
            ),
            "max_abs_diff_stored_vs_plain": stored_vs_plain(
                Path(configs["framework"].run.output_dir), kept
            ),
            "workers": variants,
        }
        row.update(per_clock(times, args.images, "plain", variants))
        row["framework_workers_cpu_s"] = [t["total"]["children_cpu"] for t in times["framework"]]
        row["ratio"] = row[args.clock]["framework"]["ratio"]
        row["goal"] = EMBED_GOAL
        row["met"] = row["ratio"] >= EMBED_GOAL
        rows.append(row)
        del retriever
    return {
        "images": args.images,
        "size": [args.width, args.height],
        "mean_file_bytes": mean_bytes,
        "generate_s": generate_s,
        "batch": args.batch,
        "workers": args.workers,
        "clock": args.clock,
        "rows": rows,
    }


# 3. webdataset ------------------------------------------------------------------------
def pack_shards(images: Path, out: Path, shards: int) -> tuple[str, int]:
    """The JPEGs under ``images`` (sorted) packed into ``shards`` uncompressed tars
    ``out/000000.tar``... with members ``000123.jpg`` (contiguous runs, as even as can
    be); returns the brace pattern naming them and the bytes written."""
    import tarfile

    paths = sorted(p for p in images.rglob("*") if p.suffix.lower() in EXTENSIONS)
    out.mkdir(parents=True, exist_ok=True)
    shards = max(1, min(shards, len(paths)))
    per, extra = divmod(len(paths), shards)
    start, written = 0, 0
    for k in range(shards):
        end = start + per + (k < extra)
        tar_path = out / f"{k:06d}.tar"
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, end):
                tar.add(paths[i], arcname=f"{i:06d}.jpg", recursive=False)
        written += tar_path.stat().st_size
        start = end
    return f"{out}/{{000000..{shards - 1:06d}}}.tar", written


def bench_webdataset(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from retrieval.factory import build_retriever

    images = root / "photos"
    start = time.perf_counter()
    if not images.exists():  # the embed part made the very same ones (same seed)
        make_photos(images, args.images, args.width, args.height)
    pattern, tar_bytes = pack_shards(images, root / "shards", args.shards)
    pack_s = time.perf_counter() - start
    rows = []
    for backbone in args.backbones:
        configs = {
            "folder": embed_config(
                args, backbone, folder_data(images), root / f"wds-{backbone}-folder", args.workers
            ),
            "webdataset": embed_config(
                args,
                backbone,
                ["dataset=webdataset", f"data.shards={pattern}"],
                root / f"wds-{backbone}-webdataset",
                args.workers,
            ),
        }
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
            retriever = build_retriever(configs["folder"]).eval()
        candidates: dict[str, Callable[[], dict[str, dict[str, float]]]] = {
            name: lambda c=cfg, r=retriever: framework_pass(c, r, args.images)
            for name, cfg in configs.items()
        }
        times = measure(candidates, args)
        row: dict[str, Any] = {"backbone": backbone, "workers": args.workers}
        row.update(per_clock(times, args.images, "folder", ["webdataset"]))
        row["ratio"] = row[args.clock]["webdataset"]["ratio"]
        row["goal"] = STREAM_GOAL
        row["met"] = row["ratio"] >= STREAM_GOAL
        rows.append(row)
        del retriever
    return {
        "images": args.images,
        "size": [args.width, args.height],
        "shards": len(list((root / "shards").glob("*.tar"))),
        "shard_bytes": tar_bytes,
        "pack_s": pack_s,
        "batch": args.batch,
        "workers": args.workers,
        "clock": args.clock,
        "rows": rows,
    }


def webdataset_table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| backbone | clock | dataset | loader workers | img/s (median) | "
        "ratio webdataset/folder | ratio range over rounds | listing s (median) | goal | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        for clock in CLOCKS:
            judged = clock == result["clock"]
            for name, r in row[clock].items():
                ratio = spread = goal = met = ""
                if "ratio" in r:
                    ratio = f"{r['ratio']:.3f}"
                    spread = f"{r['ratio_min_round']:.3f}-{r['ratio_max_round']:.3f}"
                    goal = f">= {row['goal']}"
                    met = ("yes" if row["met"] else "NO") if judged else "(not judged)"
                lines.append(
                    f"| {row['backbone']} | {clock} | {name} | {row['workers']} | "
                    f"{r['img_s']:.1f} | {ratio} | {spread} | {r['listing_s']:.3f} | {goal} | "
                    f"{met} |"
                )
    return lines


# 2. listing ---------------------------------------------------------------------------
def make_empty_files(root: Path, files: int, subfolders: int) -> None:
    """``files`` zero-byte ``.jpg`` files, as evenly as possible over ``subfolders``
    folders, with camera-like names (one ``mknod`` each: the quickest way to make them)."""
    per = -(-files // subfolders)
    made = 0
    for d in range(subfolders):
        folder = root / f"album_{d:04d}"
        folder.mkdir(parents=True)
        prefix = f"{folder}/IMG_20240101_"
        for i in range(made, min(made + per, files)):
            os.mknod(f"{prefix}{i:07d}.jpg")
        made = min(made + per, files)


def _status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (Linux), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Resets this process's peak-RSS mark to its current RSS (``clear_refs`` 5, Linux
    >= 4.0) and returns that RSS. ``ru_maxrss`` would not do: it keeps the peak of the
    parent it was forked from (a process with torch loaded), across ``execve`` too."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size since the last :func:`reset_peak_rss` (``VmHWM``)."""
    return _status_bytes("VmHWM")


def listing_child(root: str, run_dir: str) -> dict[str, Any]:
    """Runs in a fresh process: ``FolderDataset`` on ``root`` with progress on, timed and
    memory-measured by phase (the library's functions wrapped, not changed)."""
    import pyarrow.compute  # imported before the baseline, as the rest
    import pyarrow.parquet  # noqa: F401
    import rich.progress  # noqa: F401
    from PIL import Image as PILImage

    import retrieval.data.collection as collection
    import retrieval.data.folder as folder

    phases: dict[str, dict[str, float]] = {}
    headers = {"seconds": 0.0, "calls": 0}
    tickers: list[Any] = []

    def timed(name: str, fn: Callable) -> Callable:
        def wrapper(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            out = fn(*a, **k)
            phases[name] = {
                "seconds": time.perf_counter() - start,
                "peak_rss_after_mb": peak_rss_bytes() / MB,
            }
            return out

        return wrapper

    read_header = collection.image_size

    def header(path: Any) -> Any:
        start = time.perf_counter()
        try:
            return read_header(path)
        finally:
            headers["seconds"] += time.perf_counter() - start
            headers["calls"] += 1

    class RecordingTicker(collection.Ticker):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            tickers.append(self)

    folder.list_images = timed("list", folder.list_images)
    folder.Collection = timed("ids", folder.Collection)
    collection.image_size = header
    folder.Ticker = collection.Ticker = RecordingTicker

    PILImage.init()  # every format plugin, as the first failed header read would load
    baseline = reset_peak_rss()
    start = time.perf_counter()
    dataset = folder.FolderDataset(root, run_dir=run_dir, progress=True)
    written = time.perf_counter()
    dataset.collection.sync()  # the embed phase's step: images.parquet written
    phases["ids"]["seconds"] += time.perf_counter() - written
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    phases["ids"]["seconds"] -= headers["seconds"]  # "ids": assignment + table I/O only
    return {
        "images": len(dataset.image_ids),
        "seconds": seconds,
        "list_s": phases["list"]["seconds"],
        "ids_s": phases["ids"]["seconds"],
        "headers_s": headers["seconds"],
        "headers_read": headers["calls"],
        "baseline_rss_mb": baseline / MB,
        "peak_rss_mb": peak / MB,
        "peak_rss_increase_mb": (peak - baseline) / MB,
        "peak_rss_increase_after_list_mb": phases["list"]["peak_rss_after_mb"] - baseline / MB,
        "progress": [
            {
                "what": "listing" if t.description.startswith("listing") else t.description,
                "items": t.count,
                "bar_shown": t._bar is not None,
            }
            for t in tickers
        ],
    }


def run_listing_child(root: Path, run_dir: Path) -> dict[str, Any]:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import bench_embed_folder as b; "
        "print(json.dumps(b.listing_child(sys.argv[2], sys.argv[3])))"
    )
    here = str(Path(__file__).resolve().parent)
    out = subprocess.run(
        [sys.executable, "-c", code, here, str(root), str(run_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"listing subprocess failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_listing(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    folder, run_dir = root / "many", root / "run-listing"
    start = time.perf_counter()
    make_empty_files(folder, args.files, args.subfolders)
    generate_s = time.perf_counter() - start
    runs = {"first": run_listing_child(folder, run_dir)}
    runs["rerun"] = run_listing_child(folder, run_dir)
    start = time.perf_counter()
    shutil.rmtree(folder)
    remove_s = time.perf_counter() - start
    worst = max(r["peak_rss_increase_mb"] for r in runs.values())
    shown = all(t["bar_shown"] for r in runs.values() for t in r["progress"] if t["items"] > 10_000)
    return {
        "files": args.files,
        "subfolders": args.subfolders,
        "generate_s": generate_s,
        "remove_s": remove_s,
        "runs": runs,
        "peak_rss_increase_mb": worst,
        "goal_mb": MEMORY_GOAL_MB,
        "ratio_to_goal": worst / MEMORY_GOAL_MB,
        "met": worst < MEMORY_GOAL_MB,
        "progress_shown": shown,
    }


# report -------------------------------------------------------------------------------
def embed_table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| backbone | input | clock | side | loader workers | img/s (median) | ratio vs plain | "
        "ratio range over rounds | listing s (median) | goal | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        side = "x".join(str(s) for s in row["input"][1:])
        for clock in CLOCKS:
            judged = clock == result["clock"]
            for name, r in row[clock].items():
                workers = row["workers"].get(name, "-")
                if "ratio" in r:
                    ratio = f"{r['ratio']:.3f}"
                    spread = f"{r['ratio_min_round']:.3f}-{r['ratio_max_round']:.3f}"
                else:
                    ratio = spread = ""
                goal = met = ""
                if name == "framework":
                    goal = f">= {row['goal']}"
                    met = ("yes" if row["met"] else "NO") if judged else "(not judged)"
                lines.append(
                    f"| {row['backbone']} | {side} | {clock} | {name.split('_')[0]} | {workers} | "
                    f"{r['img_s']:.1f} | {ratio} | {spread} | {r['listing_s']:.3f} | {goal} | "
                    f"{met} |"
                )
    return lines


def listing_table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| run | images | total s | list s | ids + table s | header reads (s) | "
        "peak RSS increase MB | progress bars (items) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        bars = ", ".join(
            f"{t['what']} {'shown' if t['bar_shown'] else 'silent'} ({t['items']:,})"
            for t in r["progress"]
        )
        lines.append(
            f"| {name} | {r['images']:,} | {r['seconds']:.1f} | {r['list_s']:.1f} | "
            f"{r['ids_s']:.1f} | {r['headers_read']:,} ({r['headers_s']:.1f}) | "
            f"{r['peak_rss_increase_mb']:.0f} | {bars} |"
        )
    lines.append("")
    lines.append(
        f"Worst peak RSS increase {result['peak_rss_increase_mb']:.0f} MB vs goal < "
        f"{result['goal_mb']:.0f} MB (ratio {result['ratio_to_goal']:.2f}, "
        f"{'met' if result['met'] else 'NOT met'}); progress shown past "
        f"10,000 items: {'yes' if result['progress_shown'] else 'NO'}. Generating the files "
        f"took {result['generate_s']:.1f} s, removing them {result['remove_s']:.1f} s."
    )
    return lines


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# bench/bench_embed_folder.py",
        "",
        f"`{report['command']}`",
        "",
        f"Machine: {report['machine']}; torch {report['torch']} with {report['torch_threads']} "
        f"thread(s); {report['platform']}; {report['wall_s']:.0f} s wall in all.",
    ]
    if "embed" in report:
        e = report["embed"]
        lines += [
            "",
            f"## Embed over a folder vs a plain loop ({e['images']} JPEGs "
            f"{e['size'][0]}x{e['size'][1]}, mean {e['mean_file_bytes'] / 1024:.0f} KiB; "
            f"batch {e['batch']}, {e['workers']} loader workers; median of "
            f"{report['args']['repeats']} interleaved rounds after {report['args']['warmup']} "
            f"warm-up)",
            "",
            *embed_table(e),
            "",
            *(
                f"{row['backbone']}: stored fp16 embeddings vs the plain loop's, max abs "
                f"difference {row['max_abs_diff_stored_vs_plain']:.1e}; loader workers' CPU "
                f"per framework pass {statistics.median(row['framework_workers_cpu_s']):.2f} s "
                f"(median, counted in the cpu clock)."
                for row in e["rows"]
            ),
        ]
    if "webdataset" in report:
        w = report["webdataset"]
        lines += [
            "",
            f"## Embed over webdataset tar shards vs the same folder ({w['images']} JPEGs "
            f"{w['size'][0]}x{w['size'][1]} in {w['shards']} shards, "
            f"{w['shard_bytes'] / MB:.1f} MiB; batch {w['batch']}, {w['workers']} loader "
            f"workers; median of {report['args']['repeats']} interleaved rounds after "
            f"{report['args']['warmup']} warm-up)",
            "",
            *webdataset_table(w),
        ]
    if "listing" in report:
        li = report["listing"]
        lines += [
            "",
            f"## Listing {li['files']:,} zero-byte .jpg files in {li['subfolders']:,} folders",
            "",
            *listing_table(li),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(DEFAULT_PARTS))
    parser.add_argument("--images", type=int, default=256, help="embed: JPEGs generated")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--backbones", nargs="+", default=["RN-tiny"])
    parser.add_argument("--batch", type=int, default=32, help="loader.batch_size (default's)")
    parser.add_argument("--workers", type=int, default=2, help="loader.num_workers (default's)")
    parser.add_argument(
        "--compare-workers",
        type=int,
        default=0,
        help="embed: also time the framework with this many loader workers (-1: no)",
    )
    parser.add_argument("--progress", action="store_true", help="embed: run.progress=true")
    parser.add_argument("--warmup", type=int, default=1, help="embed: untimed rounds")
    parser.add_argument("--repeats", type=int, default=3, help="embed: timed rounds")
    parser.add_argument("--clock", choices=CLOCKS, default="wall", help="the one judged")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--shards", type=int, default=4, help="webdataset: tar shards")
    parser.add_argument("--files", type=int, default=1_000_000, help="listing: files made")
    parser.add_argument("--subfolders", type=int, default=1000, help="listing: folders")
    parser.add_argument("--tmp", type=Path, default=None, help="where to generate files")
    parser.add_argument("--machine", default=None, help="machine description for the report")
    parser.add_argument("--json", type=Path, help="also write every number here")
    parser.add_argument("--md", type=Path, help="also write the tables here (markdown)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    start = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_embed_folder_", dir=args.tmp) as tmp:
        root = Path(tmp)
        if "embed" in args.parts:
            results["embed"] = bench_embed(args, root)
        if "webdataset" in args.parts:
            results["webdataset"] = bench_webdataset(args, root)
        if "listing" in args.parts:
            results["listing"] = bench_listing(args, root)
    argv = sys.argv[1:] if argv is None else argv
    report = {
        "command": shlex.join(["python", "bench/bench_embed_folder.py", *argv]),
        "machine": args.machine or f"{os.cpu_count()}-core CPU, no GPU",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "wall_s": time.perf_counter() - start,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **results,
    }
    text = markdown(report)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.md:
        args.md.write_text(text)
    return report


if __name__ == "__main__":
    main()
