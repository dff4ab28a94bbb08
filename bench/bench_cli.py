"""What a ``retrieval`` command costs before it does anything, side by side in one run.

Issue 28's start-up goals: ``retrieval --help``, every ``COMMAND --help``, ``retrieval
list`` and ``retrieval index info`` import no torch and cost <= 0.3 s of CPU and <= 150
MiB; ``retrieval search`` costs its model's import and load plus <= 0.3 s. Each command
runs as a fresh process (``python -m retrieval.cli ...``, what the ``retrieval`` script
runs), and its CPU time (user + system, from ``wait4``) and peak RSS are recorded, with
two references measured in the same rounds, interleaved: ``python -c pass`` (the
interpreter alone) and ``python -c "import torch, open_clip"`` (a model's imports,
which ``search`` needs). Reported: the median over ``--repeats`` rounds, the CPU and
memory above the bare interpreter, and each command's ratio to both references.

``index info``, ``export`` and ``search`` run on small real runs: a Dense-CLIP run of
the 24 generated images as a ``folder`` collection (tiny random-weight RN, made by
``embed``: what an own-photos user exports) and its exact index; ``export (labelled
run)`` exports the same images' COCO-format run (made by ``evaluate``), whose image
paths come from its dataset's loader, which imports torch. ``search``'s cost minus the
model-import reference is its own overhead (model build and load included: the tiny
model builds in milliseconds).

    python bench/bench_cli.py --repeats 5 --json results/bench/cli_cpu.json \\
        --md results/bench/cli_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

CPU_GOAL_S = 0.3
RSS_GOAL_MIB = 150


# a small launcher: its own fork of the command starts small, so the command's peak RSS
# is its own (a child forked from this process would inherit torch's pages in ru_maxrss)
LAUNCHER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - start
use = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": done.returncode, "err": done.stderr.decode()[-2000:],
    "cpu_s": use.ru_utime + use.ru_stime, "rss_mib": use.ru_maxrss / 1024, "wall_s": wall}))
"""


def run_once(argv: list[str]) -> dict[str, float]:
    """CPU seconds (user + system), peak RSS (MiB) and wall seconds of one fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *argv], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    if result.pop("rc"):
        raise RuntimeError(f"{' '.join(argv)} failed: {result['err']}")
    result.pop("err")
    return result


def make_runs(root: Path) -> tuple[Path, Path, Path]:
    """Tiny real Dense-CLIP runs of 24 generated images: as a folder collection (with its
    exact index) and as a labelled COCO-format set."""
    from fake_runs import TINY_DENSE, tiny_dense_run

    from retrieval.config import load_config
    from retrieval.data.synthetic import make_synthetic_coco
    from retrieval.engine import embed
    from retrieval.index import build_index

    annotations, images = make_synthetic_coco(root / "data", num_images=24, seed=3)
    labelled = tiny_dense_run(annotations, images, root / "labelled")
    collection = root / "collection"
    embed(
        load_config(
            "photos",
            [f"data.images={images}", f"run.output_dir={collection}", *TINY_DENSE],
        )
    )
    index = build_index(
        collection, "exact", collection / "index" / "exact", device="cpu", progress=False
    )
    return collection, labelled, index


def commands(run: Path, labelled: Path, index: Path, out: Path) -> dict[str, list[str]]:
    py = sys.executable
    cli = [py, "-m", "retrieval.cli"]
    from retrieval.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    table = {
        "python -c pass": [py, "-c", "pass"],
        "import torch, open_clip": [py, "-c", "import torch, open_clip"],
        "retrieval --help": [*cli, "--help"],
    }
    for name in sorted(sub.choices):
        table[f"retrieval {name} --help"] = [*cli, name, "--help"]
    table["retrieval list"] = [*cli, "list"]
    table["retrieval index info"] = [*cli, "index", "info", str(index)]
    table["retrieval export"] = [
        *cli, "export", str(run), "--format", "parquet", str(out), "--force", "--no-progress",
    ]  # fmt: skip
    table["retrieval export (labelled run)"] = [
        *cli, "export", str(labelled), "--format", "parquet", str(out), "--force",
        "--no-progress",
    ]  # fmt: skip
    table["retrieval search"] = [*cli, "search", str(index), "a circle", "--device", "cpu"]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--md", help="write the table here")
    args = parser.parse_args()
    env_note = os.environ.get("BENCH_MACHINE", "shared 2-core CPU")
    with tempfile.TemporaryDirectory() as tmp:
        run, labelled, index = make_runs(Path(tmp))
        table = commands(run, labelled, index, Path(tmp) / "export.parquet")
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in table}
        for _ in range(args.repeats):  # interleaved: every command once per round
            for name, argv in table.items():
                samples[name].append(run_once(argv))
    rows: dict[str, dict[str, Any]] = {}
    for name, runs in samples.items():
        rows[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    bare, model = rows["python -c pass"], rows["import torch, open_clip"]
    for row in rows.values():
        row["cpu_over_bare_s"] = row["cpu_s"] - bare["cpu_s"]
        row["rss_over_bare_mib"] = row["rss_mib"] - bare["rss_mib"]
        row["cpu_vs_bare"] = row["cpu_s"] / bare["cpu_s"]
        row["cpu_vs_model_import"] = row["cpu_s"] / model["cpu_s"]
    search = rows["retrieval search"]
    search["cpu_over_model_import_s"] = search["cpu_s"] - model["cpu_s"]
    lines = [
        f"# `retrieval` start-up cost ({env_note}, median of {args.repeats} interleaved rounds)",
        "",
        f"Goals: the light commands <= {CPU_GOAL_S} s CPU and <= {RSS_GOAL_MIB} MiB above the "
        f"bare interpreter with no torch; `search` <= its model's import + load + "
        f"{CPU_GOAL_S} s. Written by `python bench/bench_cli.py`.",
        "",
        "| command | CPU s | CPU above `python -c pass` | x `python -c pass` | "
        "x `import torch, open_clip` | peak RSS MiB | RSS above bare |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| `{name}` | {row['cpu_s']:.2f} | {row['cpu_over_bare_s']:+.2f} | "
            f"{row['cpu_vs_bare']:.1f} | {row['cpu_vs_model_import']:.2f} | "
            f"{row['rss_mib']:.0f} | {row['rss_over_bare_mib']:+.0f} |"
        )
    lines += [
        "",
        f"`retrieval search` minus `import torch, open_clip`: "
        f"{search['cpu_over_model_import_s']:+.2f} s CPU (model build and load, index open, "
        f"text encoding, search and printing; tiny random-weight model).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": env_note, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
