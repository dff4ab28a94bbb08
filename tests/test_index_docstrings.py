"""The index modules quote no timings: measurements live in results/bench (issue 25).

Invariant: no docstring or comment in ``retrieval/index/*.py`` states a measured time or
speed ratio (``4.5 s``, ``23 ms``, ``2 ns``, ``2,000 rows/s``, ``2-3x faster``); a
design choice that rests on one points to the results/bench file that holds it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import retrieval.index

INDEX = Path(retrieval.index.__file__).parent
TIMING = re.compile(r"\d(?:\.\d+)? ?(?:ms|ns|s)\b|rows/s|reps/s|\dx (?:faster|slower)")


@pytest.mark.parametrize("path", sorted(INDEX.glob("*.py")), ids=lambda p: p.name)
def test_no_timings_in_index_code(path: Path) -> None:
    found = [
        f"{path.name}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if TIMING.search(line)
    ]
    assert not found, "move these measurements to results/bench/search_cpu.md:\n" + "\n".join(found)


def test_the_pattern_catches_a_timing() -> None:
    assert TIMING.search("take 4.5 s on two threads against 0.06 s on one")
    assert TIMING.search("slow to insert (~2,000 rows/s here)")
    assert TIMING.search("faiss's fp16 flat codes are 2-3x faster")
    assert not TIMING.search("timeout seconds; ``load_timeout``")
