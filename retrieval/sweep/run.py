"""Running a planned sweep: each run in turn, finished ones skipped, failures collected.

Each run is an ordinary ``evaluate`` (Lightning predict with the run's ``trainer.*``),
so a sweep launched under torchrun or SLURM runs every extraction across all processes,
exactly as ``retrieval eval`` would; every process plans from the same files and so
walks the same list. A failed run is reported and the sweep goes on (unless
``fail_fast``); the runs reading a failed extraction's shards are skipped, said so.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from omegaconf import DictConfig
from rich.console import Console

from retrieval.errors import RetrievalError
from retrieval.sweep.plan import PlannedRun


@dataclass
class Outcome:
    """What happened to one run."""

    name: str
    state: str  # skipped (already done) | ran | failed | blocked
    message: str = ""
    seconds: float = 0.0


@dataclass
class SweepOutcome:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.state in ("failed", "blocked")]


def _evaluate(cfg: DictConfig) -> object:
    from retrieval.engine import evaluate

    return evaluate(cfg)


def run_sweep(
    runs: list[PlannedRun],
    fail_fast: bool = False,
    console: Console | None = None,
    evaluate: Callable[[DictConfig], object] = _evaluate,
) -> SweepOutcome:
    """Runs every run not done yet, in order; returns what happened to each.

    Raises:
        RetrievalError: the first failure, when ``fail_fast`` (after the summary line).
    """
    console = console or Console()
    result = SweepOutcome()
    broken: set[str] = set()
    total = len(runs)
    for number, run in enumerate(runs, start=1):
        done = sum(o.state in ("skipped", "ran") for o in result.outcomes)
        how = f"from {run.source}'s dense shards" if run.source else "backbone"
        console.rule(
            f"[{number}/{total}] {run.name} ({how}) - {done} done, {total - number + 1} left"
        )
        if run.status == "done":
            console.print(f"{run.name}: already done in {run.run_dir}; skipped")
            result.outcomes.append(Outcome(run.name, "skipped"))
            continue
        if run.source in broken:
            message = f"its extraction {run.source} failed"
            console.print(f"[red]{run.name}: not run: {message}")
            result.outcomes.append(Outcome(run.name, "blocked", message))
            broken.add(run.name)
            continue
        if run.status == "changed":
            console.print(f"[yellow]{run.name}: {run.run_dir} holds results of another config "
                          f"({run.detail}); running it again")  # fmt: skip
        start = time.perf_counter()
        try:
            evaluate(run.cfg)
        except Exception as err:  # one run's failure must not stop the others
            message = str(err) if isinstance(err, RetrievalError) else traceback.format_exc()
            console.print(f"[red]{run.name} failed: {message}")
            result.outcomes.append(Outcome(run.name, "failed", message.strip()))
            broken.add(run.name)
            if fail_fast:
                raise
            continue
        result.outcomes.append(Outcome(run.name, "ran", seconds=time.perf_counter() - start))
    return result
