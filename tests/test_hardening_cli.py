"""Hostile or careless input (issue 15): an index build never deletes what the project did
not write; impossible config values, devices, queries and `--top`s, and YAML alias bombs
are one message (a RetrievalError, `error:` + exit 2 in the CLI), not a traceback or a
hang; report files escape the names they quote; and a fuzz test over `key=value`
overrides finds nothing but a valid config or a RetrievalError."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from retrieval.cli import main
from retrieval.config import EvalConfig, load_config, retriever_schema
from retrieval.errors import ConfigError, IndexFileError, RetrievalError
from retrieval.index import build_index, open_index
from retrieval.index.build import FORMAT
from retrieval.report.compare import _markdown_table
from retrieval.report.console import md, summary_markdown
from tests.test_search import DIM, make_run, queries

HAS_CUDA = torch.cuda.is_available()


# -- (a) index build --out: only the project's own index folders are replaced ------------


@pytest.mark.parametrize(
    "manifest",
    ["not json at all", "[1, 2]", json.dumps({"format": FORMAT}), json.dumps({"x": 1})],
)
def test_build_out_refuses_a_folder_it_did_not_write(tmp_path: Path, manifest: str) -> None:
    """A non-empty --out whose index.json is not this project's manifest (any file of that
    name) is refused and left byte for byte as it was."""
    run = make_run(tmp_path / "run", [(range(10), 3)])
    out = tmp_path / "mine"
    out.mkdir()
    (out / "index.json").write_text(manifest)
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(IndexFileError, match="not an index made by"):
        build_index(run, "exact", out, "cpu", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "thesis.tex"]
    assert (out / "thesis.tex").read_text() == "years of work"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_build_out_refuses_a_file_and_replaces_its_own_index(tmp_path: Path) -> None:
    """A file as --out is refused untouched; an index the project built is replaced by a
    rebuild (and an empty folder is used)."""
    run = make_run(tmp_path / "run", [(range(10), 3)])
    file = tmp_path / "notes.txt"
    file.write_text("keep")
    with pytest.raises(IndexFileError, match="is a file"):
        build_index(run, "exact", file, "cpu", progress=False)
    assert file.read_text() == "keep"
    (tmp_path / "empty").mkdir()
    out = build_index(run, "exact", tmp_path / "empty", "cpu", progress=False)
    first = json.loads((out / "index.json").read_text())["created"]
    again = build_index(run, "exact", out, "cpu", progress=False)
    assert again == out
    assert json.loads((out / "index.json").read_text())["format"] == FORMAT
    assert first  # rebuilt in place, still an index
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_build_out_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = make_run(tmp_path / "run", [(range(10), 3)])
    out = tmp_path / "mine"
    out.mkdir()
    (out / "index.json").write_text("{}")
    (out / "data.csv").write_text("a,b")
    assert main(["index", "build", str(run), "--out", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("error: --out")
    assert (out / "data.csv").read_text() == "a,b"


def test_cli_build_option_without_value_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An --option that is not key=value is a ConfigError: `error:` naming it and the
    form, exit 2, no traceback, and refused before the build writes anything."""
    run = make_run(tmp_path / "run", [(range(10), 3)])
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    argv = ["index", "build", str(run), "--backend", "faiss", "--option", "nprobe", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == "error: --option 'nprobe' must look like key=value (e.g. --option nprobe=32)\n"
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    argv[argv.index("nprobe")] = "nprobe=32"  # as the message says
    assert main(argv) == 0


# -- (b) config values, devices, queries, --top, YAML bombs, report escaping -------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("protocol.top_k=0", "protocol.top_k"),
        ("protocol.top_k=-3", "protocol.top_k"),
        ("loader.batch_size=0", "loader.batch_size"),
        ("loader.num_workers=-1", "loader.num_workers"),
        ("trainer.devices=0", "trainer.devices"),
        ("trainer.devices=-5", "trainer.devices"),
        ("store.shard_size=0", "store.shard_size"),
        ("score.max_memory_gb=0", "score.max_memory_gb"),
        ("score.max_memory_gb=-1.5", "score.max_memory_gb"),
        ("text.batch_size=0", "text.batch_size"),
        ("retriever.resolution=30000", "retriever.resolution"),
        ("retriever.resolution=8", "retriever.resolution"),
        ("score.device=potato", "score.device"),
        ("score.device=cuda:x", "score.device"),
        ("trainer.accelerator=potato", "trainer.accelerator"),
    ],
)
def test_impossible_values_fail_at_load_config(override: str, key: str) -> None:
    """Values of the right type that cannot work are refused by load_config, naming the
    key, before any dataset or model is built."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("demo", [override])


def test_sane_values_still_load() -> None:
    cfg = load_config(
        "demo",
        [
            "protocol.top_k=1",
            "loader.num_workers=0",
            "trainer.devices=-1",
            "retriever.resolution=224",
            "score.device=cpu",
            "trainer.accelerator=cpu",
        ],
    )
    assert cfg.retriever.resolution == 224
    assert cfg.trainer.devices == -1


@pytest.mark.skipif(HAS_CUDA, reason="checks a machine without a GPU")
@pytest.mark.parametrize(
    "override", ["score.device=cuda", "score.device=cuda:1", "trainer.accelerator=gpu"]
)
def test_gpu_settings_without_a_gpu_are_one_message(
    override: str, capsys: pytest.CaptureFixture
) -> None:
    """Asking for a GPU on a machine without one: one `error:` line naming the key, exit 2."""
    with pytest.raises(ConfigError, match="no cuda device"):
        load_config("demo", [override])
    assert main(["eval", "demo", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    assert override.split("=")[0] in err


@pytest.fixture(scope="module")
def small_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hardening")
    run = make_run(root / "run", [(range(30), 3)])
    return build_index(run, "exact", root / "ix", "cpu", progress=False)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["   "], "is empty"),
        ([""], "is empty"),
        (["cat", "--device", "potato"], "--device"),
        (["cat", "--top", "0"], "--top 0"),
    ]
    + ([] if HAS_CUDA else [(["cat", "--device", "cuda"], "no cuda device")]),
)
def test_search_cli_bad_input_is_one_error_line(
    small_index: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    """An empty query, a bogus or absent device and a top below 1 are refused before the
    index or model is opened: one `error:` line, exit 2."""
    assert main(["search", str(small_index), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    assert message in err


def test_huge_top_is_capped_before_the_engine(
    small_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`top` of a billion reaches no backend: it is capped at the index's image count
    (SearchIndex does it, so every backend gets the same cap); below 1 is refused."""
    index = open_index(small_index, "cpu")
    asked: list[int] = []
    original = index.backend.search

    def spy(q, k, allowed=None):  # type: ignore[no-untyped-def]
        asked.append(k)
        return original(q, k, allowed)

    monkeypatch.setattr(index.backend, "search", spy)
    hits = index.search_vectors(queries(2, seed=0), 1_000_000_000)
    assert asked == [30]
    assert index.num_images == 30
    assert all(len(h) == 30 for h in hits)
    with pytest.raises(ConfigError, match="at least 1"):
        index.search_vectors(queries(1, seed=0), 0)
    with pytest.raises(ConfigError, match="is empty"):
        index.search(" \t", 5)
    assert index.embed_dim == DIM


BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


@pytest.mark.parametrize(
    "text",
    [BOMB, "a: &a [*a]\n", "run:\n  seed: 1\n" + "# padding\n" * 200_000],
    ids=["billion-laughs", "self-alias", "oversized"],
)
def test_yaml_bombs_are_refused_quickly(
    tmp_path: Path, text: str, capsys: pytest.CaptureFixture
) -> None:
    """A config whose aliases expand past the bound, refer to themselves, or a file over
    the size bound: refused within seconds, one `error:` line naming the file."""
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="bomb.yaml"):
        load_config(path)
    assert main(["eval", str(path)]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert err.count("\n") == 1


def test_anchors_within_bounds_still_work(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(
        "defaults:\n  - dataset: synthetic\n  - retriever: clip_tiny\n"
        "logger:\n  wandb:\n    tags: &t [x, y]\n    group: grp\nx_shared: *t\n"
    )
    with pytest.raises(ConfigError, match="x_shared"):  # the alias loads; the key is unknown
        load_config(path)


HOSTILE = "<script>alert(1)</script> | [x](javascript:alert(1)) `code`"


def test_report_markdown_escapes_names() -> None:
    """A category name (or any quoted text) with HTML or markdown syntax is written as
    entities in summary.md and compare.md tables: no tag, no extra cell, no link."""
    cfg = load_config("demo")
    summary = {
        "map@50": 0.5,
        "timing": {
            "extract_seconds": 1.0,
            "images_embedded": 2,
            "reused_embeddings": 0,
            "score_ms_per_image": 0.1,
        },
        "images": 2,
        "reps_per_image": {"mean": 1.0, "max": 1},
        "bytes_per_image": 10.0,
        "protocol": {"note": HOSTILE},
        "skipped_images": [{"path": f"/x/{HOSTILE}.jpg", "reason": HOSTILE}],
    }
    rows = [{"name": HOSTILE, "positives": 3, "ap@50": 0.4, "ap": 0.3}]
    text = summary_markdown(cfg, summary, rows)
    table = "\n".join(_markdown_table(["category", "x"], [[HOSTILE, "1"]]))
    for written in (text, table):
        assert "<script>" not in written
        assert "](" not in written
        assert "`" not in written
        assert "&lt;script&gt;" in written
    row = next(line for line in text.splitlines() if "script" in line and "|" in line)
    assert row.count("|") == 5  # four cells, no cell break from the name
    assert md("a_b c") == "a_b c"  # ordinary names are left readable


# -- (c) fuzz: overrides give a config or a RetrievalError, never anything else ----------


def _schema_keys() -> list[str]:
    keys = []

    def walk(node, prefix: str) -> None:  # type: ignore[no-untyped-def]
        for key in node:
            child = node._get_node(key)
            dotted = f"{prefix}{key}"
            keys.append(dotted)
            if OmegaConf.is_dict(child):
                walk(child, f"{dotted}.")

    walk(OmegaConf.structured(EvalConfig), "")
    walk(retriever_schema("clip"), "retriever.")
    walk(load_config("demo").data, "data.")
    return sorted(set(keys))


KEYS = _schema_keys()
VALUES = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(
        [
            "true",
            "false",
            "null",
            "",
            "~",
            "[]",
            "{}",
            "[1, 2]",
            "{a: 1}",
            "${run.seed}",
            "${oops}",
            "auto",
            "cpu",
            "cuda",
            "gpu",
            "cuda:7",
            "'quoted'",
            '"x',
            "[",
            "}",
            "a=b",
            "nan",
            "-inf",
            "1e999",
            "0x10",
            "../../etc",
        ]
    ),
    st.text(max_size=12),
)
KEY = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(["retriever", "dataset"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz._[]$0 ", min_size=0, max_size=12),
)
OVERRIDE = st.one_of(
    st.tuples(KEY, VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=12),  # junk, often without '='
)


@settings(
    max_examples=200,
    deadline=5000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(OVERRIDE, max_size=4))
@example(["[=0"])  # omegaconf's key-path parser raised IndexError (found by this test)
@example(["a[=1", "]=x"])
@example(["data.name=${run.seed}", "run=0"])  # the section name's interpolation (found here)
def test_fuzzed_overrides_give_a_config_or_a_retrieval_error(overrides: list[str]) -> None:
    """Random keys of the real schema with random-typed values, plus junk keys: load_config
    returns or raises a RetrievalError — never another exception, never a hang."""
    with contextlib.suppress(RetrievalError):
        load_config("demo", overrides)
