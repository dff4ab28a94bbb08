"""How the memory-mapped vector table is read: an approximate engine's exact re-rank
reads scattered rows, so a table the page cache cannot keep is advised for random reads
(bench/bench_rerank_reads.py measures the disk reads it saves)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval.index import base, build_index, open_index
from tests.test_search import make_run


def random_read_advised(vectors: Path) -> bool:
    """Whether this process maps ``vectors`` with the kernel's random-read flag (``rr``
    in /proc/self/smaps' VmFlags)."""
    advised, inside = False, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if not line[:1].isupper() and "-" in line.split()[0]:  # a mapping's header line
            inside = line.endswith(str(vectors))
        elif inside and line.startswith("VmFlags:"):
            advised = advised or "rr" in line.split()[1:]
    return advised


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc")
def test_a_table_larger_than_memory_allows_is_read_by_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: an approximate index whose table exceeds half the machine's memory maps
    it for random reads (and answers the same); a smaller one, or an exact index, keeps
    the kernel's readahead."""
    run = make_run(tmp_path / "run", [(range(300), 8)])
    ivf = build_index(run, "faiss-ivfpqfs", tmp_path / "ivf", "cpu", progress=False)
    exact = build_index(run, "exact", tmp_path / "exact", "cpu", progress=False)
    q = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    with open_index(ivf, "cpu") as index:
        assert not random_read_advised(ivf / "vectors.f16")
        before = index.search_vectors(q, 10)
    monkeypatch.setattr(base, "physical_memory", lambda: 1)
    with open_index(ivf, "cpu") as index:
        assert random_read_advised(ivf / "vectors.f16")
        assert index.search_vectors(q, 10) == before
    with open_index(exact, "cpu"):
        assert not random_read_advised(exact / "vectors.f16")
