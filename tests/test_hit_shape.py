"""One hit, one shape (issue 28.6) and compound queries in the CLI (28.7): the CLI's
--json, the Python Hit, the gallery, the API's schema and the export name a hit's fields
the same way;
a compound query from the shell is the server's formula, checked against NumPy."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import get_type_hints

import numpy as np
import pyarrow.parquet as pq
import pytest

from retrieval.cli import main
from retrieval.errors import ConfigError
from retrieval.index import build_index, open_index
from retrieval.index.compound import parse_compound
from retrieval.index.hits import HIT_FIELDS, ROW_FIELDS, Hit
from retrieval.store import ShardStore


@pytest.fixture(scope="module")
def index_dir(dense_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hit_shape") / "exact"
    return build_index(dense_run, "exact", out, device="cpu", progress=False)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def reference_scores(run: Path, q: np.ndarray) -> dict[int, tuple[float, int]]:
    """Per image: (max cosine of ``q`` over its valid representatives, that slot), by a
    plain loop over the run's shards."""
    best = {}
    for shard in ShardStore(run / "embeddings").iter_shards():
        emb = shard.reps.embeddings.float().numpy()
        mask = shard.reps.mask.numpy()
        for i, image_id in enumerate(shard.image_ids.tolist()):
            slots = np.flatnonzero(mask[i])
            scores = emb[i, slots] @ q
            best[int(image_id)] = (float(scores.max()), int(slots[scores.argmax()]))
    return best


@pytest.mark.parametrize(
    ("text", "positive", "negative"),
    [
        ("a red circle", ["a red circle"], []),
        ("a red circle -a red ring", ["a red circle"], ["a red ring"]),
        ("a t-shirt - a bicycle + a dog", ["a t-shirt", "a dog"], ["a bicycle"]),
        ("+a stroller", ["a stroller"], []),
        ("  a  cat   -dog -bird ", ["a cat"], ["dog", "bird"]),
    ],
)
def test_compound_syntax_is_the_pages(text: str, positive: list[str], negative: list[str]):
    """The page's parseQuery rule (app.js): a phrase starts at a word beginning with + or
    - (or a lone sign); a hyphen inside a word belongs to it; no sign: one plain text."""
    parsed = parse_compound(text)
    assert (parsed.positive, parsed.negative) == (positive, negative)
    assert parsed.compound == (len(positive) > 1 or bool(negative))


def test_a_query_with_only_negatives_is_refused() -> None:
    with pytest.raises(ConfigError, match="no phrase to find"):
        parse_compound("-a bicycle")


def test_cli_compound_query_is_the_formula(
    dense_run: Path, index_dir: Path, tmp_path: Path
) -> None:
    """`retrieval search INDEX "a -b -c"` ranks by normalise(p - 0.5 n) with p = t_a and
    n = normalise(t_b + t_c) (docs/serve.md's formula), every image scored by its max
    cosine over its representatives: scores, order and matched slots equal a NumPy loop
    over the run's shards with the texts embedded one by one."""
    out = tmp_path / "hits.json"
    query = "circle -square -triangle"
    argv = ["search", str(index_dir), query, "--top", "6", "--device", "cpu", "--json", str(out)]
    assert main(argv) == 0
    with open_index(index_dir, "cpu") as index:
        t = {
            w: index.embed([w])[0].numpy().astype(np.float64)
            for w in ("circle", "square", "triangle")
        }
    p = _unit(t["circle"])
    n = _unit(t["square"] + t["triangle"])
    q = _unit(p - 0.5 * n)
    truth = reference_scores(dense_run, q)
    expected = sorted(truth, key=lambda i: -truth[i][0])[:6]
    hits = json.loads(out.read_text())["hits"]
    assert [h["image_id"] for h in hits] == expected
    for h in hits:
        assert h["score"] == pytest.approx(truth[h["image_id"]][0], abs=2e-3)  # fp16 store
        assert h["rep_index"] == truth[h["image_id"]][1]
    # not the literal text: "circle -square -triangle" embedded as one string ranks otherwise
    literal = _unit(index_embed(index_dir, query))
    assert not np.allclose(literal, q, atol=1e-3)


def index_embed(index_dir: Path, text: str) -> np.ndarray:
    with open_index(index_dir, "cpu") as index:
        return index.embed([text])[0].numpy().astype(np.float64)


def test_cli_json_python_api_and_export_share_one_shape(
    dense_run: Path,
    index_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CLI's --json hits have exactly the hit fields, equal to the Python Hits'
    records (same ids, scores, slots, boxes, files); the API's HitOut is those fields plus
    image_url; an export row starts with the same row fields. The terminal table names
    each hit's file."""
    monkeypatch.setenv("COLUMNS", "400")  # the table's file column unfolded
    out = tmp_path / "hits.json"
    gallery = tmp_path / "hits.html"
    argv = ["search", str(index_dir), "circle", "--top", "5", "--device", "cpu"]
    assert main([*argv, "--json", str(out), "--gallery", str(gallery)]) == 0
    table = capsys.readouterr().out
    hits = json.loads(out.read_text())["hits"]
    assert all(tuple(h) == HIT_FIELDS for h in hits)
    with open_index(index_dir, "cpu") as index:
        python = index.search("circle", top=5)
    for rank, (h, hit) in enumerate(zip(hits, python, strict=True), start=1):
        assert isinstance(hit, Hit)
        record = hit.record(rank, h["path"])
        assert record["image_id"] == h["image_id"]
        assert record["rep_index"] == h["rep_index"]
        assert record["rank"] == h["rank"] == rank
        assert record["score"] == pytest.approx(h["score"], abs=1e-6)
        assert record["box"] == pytest.approx(h["box"], abs=1e-6)
        assert Path(h["path"]).is_file()
        assert h["file_name"] == Path(h["path"]).name
        assert h["file_name"] in table
    shown = [
        json.loads(html.unescape(m)) for m in re.findall(r'data-hit="([^"]*)"', gallery.read_text())
    ]
    assert shown == hits  # the gallery's figures carry the same records
    from retrieval.serve.schemas import HitOut

    assert tuple(get_type_hints(HitOut)) == (*HIT_FIELDS, "image_url")
    export = tmp_path / "reps.parquet"
    assert (
        main(["export", str(dense_run), "--format", "parquet", str(export), "--no-progress"]) == 0
    )
    columns = pq.read_schema(export).names
    assert tuple(columns[: len(ROW_FIELDS)]) == ROW_FIELDS
    rows = pq.read_table(export).to_pandas()
    first = rows[(rows.image_id == hits[0]["image_id"]) & (rows.rep_index == hits[0]["rep_index"])]
    assert first.path.tolist() == [hits[0]["path"]]
    assert list(first.box.iloc[0]) == pytest.approx(hits[0]["box"], abs=1e-3)
