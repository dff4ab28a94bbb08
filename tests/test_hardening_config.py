"""Values that used to escape validation (issue 24, items 12 and 13): each is one
message naming the key or option and the fix, before any model or data is loaded."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from retrieval.cli import main
from retrieval.config import LARGEST_INT, load_config
from retrieval.data.coco import CocoDataset
from retrieval.errors import ConfigError, DataError, StoreError
from retrieval.serve.security import MIN_TOKEN_LENGTH, check_bind


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.precision=8-bogus", r"trainer.precision='8-bogus' is not one of .*32-true"),
        ("trainer.precision=16-mixd", r"Did you mean '16-mixed'\?"),
        ("protocol.top_k=99999999999999999999", f"must be at most {LARGEST_INT}"),
        ("loader.batch_size=4294967296", f"must be at most {LARGEST_INT}"),
    ],
)
def test_impossible_values_fail_at_load(override: str, message: str) -> None:
    """`trainer.precision=8-bogus` (a Lightning traceback before) and a top_k past any
    index size (failed after the whole embed) are refused when the config loads."""
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


def test_experiment_typo_names_the_experiment() -> None:
    """A typo'd experiment name suggests the experiment and lists the known ones (the
    lookup searches configs/experiment/, and so does the list; it was empty)."""
    with pytest.raises(ConfigError) as err:
        load_config("clip_rn50_cocoo")
    text = str(err.value)
    assert "Did you mean 'clip_rn50_coco'?" in text
    known = text.split("Known: ")[1].split(", ")
    assert "clip_rn50_coco" in known
    assert "demo" in known


def test_deeply_nested_annotations_are_one_message(tmp_path: Path, synthetic_coco) -> None:
    """Annotation JSON nested 100,000 deep (a RecursionError before): a DataError."""
    _, images = synthetic_coco
    path = tmp_path / "deep.json"
    path.write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DataError, match="nests its values too deeply"):
        CocoDataset(str(path), str(images))


def test_serve_port_out_of_range_or_taken_fails_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`serve --port 99999` (a traceback after loading the model) and a port another
    process listens on (exit 3 after 30 s) are one message at once, naming the fix."""
    start = time.perf_counter()
    assert main(["serve", str(tmp_path / "ix"), "--port", "99999"]) == 2
    assert "--port 99999: a TCP port is 1..65535" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tmp_path / "ix"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port} on 127.0.0.1: cannot listen (another process is listening" in err
    assert "choose another --port" in err
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("token", [" ", "x", "   " * 8, "short-secret", "a" * 15, "a b" * 8])
def test_a_public_bind_needs_a_real_secret(token: str) -> None:
    """A whitespace-only, one-character or short token (or one with whitespace) is refused
    for a bind beyond loopback; a real one is accepted, and loopback needs none."""
    with pytest.raises(ConfigError, match=f"at least {MIN_TOKEN_LENGTH} characters"):
        check_bind("0.0.0.0", token)
    check_bind("0.0.0.0", "k3Y-" * 4)
    check_bind("127.0.0.1", token)
    check_bind("127.0.0.1", None)


def test_a_run_whose_only_shard_is_gone_says_so(tmp_path: Path) -> None:
    """A run with one shard, deleted: the message names the missing shard and the fix
    (it read "not a run folder"); a folder that never held a run still reads that."""
    from retrieval.store import ShardStore
    from retrieval.store.shards import open_run_store
    from tests.test_search import make_run

    run = make_run(tmp_path / "run", [(range(5), 2)])
    ShardStore(run / "embeddings").record_checksums()
    for shard in (run / "embeddings").glob("*.safetensors"):
        shard.unlink()
    with pytest.raises(StoreError, match=r"rank000-00000.safetensors listed in .* are missing"):
        open_run_store(run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="is not a run folder"):
        open_run_store(tmp_path / "empty")


def test_a_folder_in_use_is_said_before_the_model_loads(tmp_path: Path, synthetic_coco) -> None:
    """`retrieval embed` into a folder another run holds: the error names the holder
    before validation imports the retrievers (it came after ~20 s of imports and model
    building): in a fresh interpreter, open_clip is never imported."""
    import subprocess
    import sys

    from retrieval.store.lock import RunLock

    ann, images = synthetic_coco
    run = tmp_path / "run"
    code = (
        "import sys; from retrieval.cli import main; "
        f"rc = main(['embed', 'demo', 'data.annotations={ann}', 'data.images={images}', "
        f"'run.output_dir={run}']); print(rc, 'open_clip' in sys.modules)"
    )
    root = Path(__file__).resolve().parent.parent
    with RunLock(run):
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300
        )
    assert done.stdout.split() == ["2", "False"], done.stderr[-2000:]
    assert f"{run} is in use by another run (pid" in done.stderr


def test_a_query_past_clips_context_is_named(caplog: pytest.LogCaptureFixture) -> None:
    """A query longer than CLIP's 77 tokens (cut by the tokenizer, silently before) gets a
    warning naming it; a short one none. The embedding is still the cut text's."""
    from retrieval import create_retriever

    clip = create_retriever("clip", backbone="RN-tiny", pretrained=None)
    long = "a red circle beside a blue square " * 20
    caplog.clear()
    with caplog.at_level("WARNING", logger="retrieval"):
        clip.encode_text(["a red circle"])
        assert not [r for r in caplog.records if r.name == "retrieval"]
        clip.encode_text([long])
    assert "fills the model's 77-token context" in caplog.text
    assert "a red circle" in caplog.text
