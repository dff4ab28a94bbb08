"""Dataset set-up: download (offline failure, resume, checksums), check, and the CLI."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from PIL import Image
from test_data_lvis import HANDMADE as LVIS_HANDMADE
from test_data_lvis import write_lvis
from test_data_nuimages import handmade_tables

from retrieval.cli import build_parser, main
from retrieval.config import CONFIG_DIR
from retrieval.data import download as dl
from retrieval.data.synthetic import make_synthetic_coco

# --- a local HTTP server: the only network these tests use ---------------------------


class Server:
    """Serves ``files`` (path -> bytes) on 127.0.0.1 with HTTP range support, and records
    each request's Range header."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ranges: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server's name
                data = server.files.get(self.path)
                server.ranges.append(self.headers.get("Range"))
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    s = Server()
    yield s
    s.close()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data).hexdigest()


def jpeg(colour=(10, 20, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def coco_tree(tmp_path: Path) -> Path:
    """A data root holding a small COCO val2017 in the standard layout."""
    annotations, images = make_synthetic_coco(tmp_path / "gen", num_images=6)
    root = tmp_path / "root"
    (root / "coco" / "annotations").mkdir(parents=True)
    annotations.rename(root / "coco" / "annotations" / "instances_val2017.json")
    images.rename(root / "coco" / "val2017")
    return root


SMALL_COCO = {"images": 6, "categories": 8}
SMALL_LVIS = {"images": 5, "categories": 5, "rare": 2, "common": 1, "frequent": 2}


# --- check --------------------------------------------------------------------------


def test_check_coco_pass_and_fail(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Invariant: check passes on a complete copy (counts as expected, every file there),
    and fails naming each wrong count and a missing file."""
    root = coco_tree(tmp_path)
    report = dl.check("coco", root, expected=SMALL_COCO)
    assert report.ok, str(report)
    assert "coco under" in capsys.readouterr().out

    (root / "coco" / "val2017" / "000000000003.jpg").unlink()
    report = dl.check("coco", root)  # the full split's counts: 5,000 images, 80 categories
    out = capsys.readouterr().out
    assert not report.ok
    assert "NOT complete" in out
    assert "[FAIL] images listed: 6 (expected 5000)" in out
    assert "[FAIL] categories: 8 (expected 80)" in out
    assert "[FAIL] image files present: 5 of 6; missing e.g." in out
    assert "000000000003.jpg" in out
    assert "retrieval data download coco" in out


def test_check_lvis_pass_and_fail(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Invariant: check loads LVIS as an evaluation would (images under <root>/coco from
    coco_url), compares frequency counts, and fails when a train2017 image is missing."""
    (tmp_path / "lvis").mkdir()
    write_lvis(tmp_path, LVIS_HANDMADE)
    (tmp_path / "lvis_v1_val.json").rename(tmp_path / "lvis" / "lvis_v1_val.json")
    assert dl.check("lvis", tmp_path, expected=SMALL_LVIS).ok
    assert not dl.check("lvis", tmp_path, expected={**SMALL_LVIS, "rare": 337}).ok
    (tmp_path / "coco" / "train2017" / "000000000030.jpg").unlink()
    report = dl.check("lvis", tmp_path, expected=SMALL_LVIS)
    assert not report.ok
    assert "image files present: 4 of 5" in capsys.readouterr().out


def test_check_nuimages_pass_and_fail(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Invariant: check finds the tables in <root>/nuimages/v1.0-val and the key frames
    under <root>/nuimages; without the tables it fails and prints the manual steps."""
    assert not dl.check("nuimages", tmp_path).ok
    out = capsys.readouterr().out
    assert "[FAIL] annotations" in out
    assert "nuimages-v1.0-all-metadata.tgz" in out
    tables, _ = handmade_tables()
    tables.write(tmp_path / "nuimages")
    assert dl.check("nuimages", tmp_path, expected={"images": 4, "categories": 5}).ok


def test_check_unloadable_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Invariant: a file that does not load is a failed line with the loader's message."""
    path = tmp_path / "lvis" / "lvis_v1_val.json"
    path.parent.mkdir()
    path.write_text("not json")
    assert not dl.check("lvis", tmp_path).ok
    assert "cannot load it" in capsys.readouterr().out


# --- offline ------------------------------------------------------------------------


def test_offline_download_fails_at_once(tmp_path: Path, monkeypatch) -> None:
    """Invariant: with the host unreachable (a name that never resolves, RFC 2606), the
    download fails within seconds, names the host and says how to proceed; nothing is
    written."""
    archive = dl.Archive("http://images.example.invalid/zips/val2017.zip", "md5:0", "v/", "coco")
    monkeypatch.setitem(dl.ARCHIVES, "coco", (archive,))
    start = time.perf_counter()
    with pytest.raises(dl.DownloadError) as info:
        dl.download("coco", tmp_path / "root")
    assert time.perf_counter() - start < dl.PROBE_TIMEOUT_S + 1
    message = str(info.value)
    assert "images.example.invalid:80 is unreachable" in message
    assert "no network access" in message
    assert "retrieval data check" in message
    assert not (tmp_path / "root").exists()


def test_offline_real_hosts(tmp_path: Path, monkeypatch) -> None:
    """Invariant: the real archive hosts are probed first: with sockets failing as on a
    machine without network, COCO and LVIS downloads fail at once naming their host."""

    def no_network(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(dl.DownloadError, match="images.cocodataset.org:80 is unreachable"):
        dl.download("coco", tmp_path)
    with pytest.raises(dl.DownloadError, match="dl.fbaipublicfiles.com:443 is unreachable"):
        dl.download("lvis", tmp_path)


def test_nuimages_download_prints_steps(tmp_path: Path, capsys, monkeypatch) -> None:
    """Invariant: 'download nuimages' needs no network: it prints the licence steps with
    the target folder and fetches nothing."""
    monkeypatch.setattr(dl, "_probe", lambda *a: pytest.fail("probed the network"))
    assert dl.download("nuimages", tmp_path) == tmp_path
    out = capsys.readouterr().out
    assert "nuscenes.org" in out
    assert str(tmp_path / "nuimages") in out
    assert list(tmp_path.iterdir()) == []


# --- fetching (against the local server) --------------------------------------------


def test_resume_and_checksum(tmp_path: Path, server: Server) -> None:
    """Invariant: a partial .part file is continued with an HTTP Range request (not
    fetched again), the result has the known hash; a wrong hash fails and leaves nothing."""
    data = zip_bytes({"val2017/a.jpg": jpeg()}) * 3
    server.files["/zips/big.zip"] = data
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "big.zip.part").write_bytes(data[:100])
    archive = dl.Archive(server.url + "/zips/big.zip", md5(data), "val2017/", "coco")
    path = dl.fetch_archive(archive, folder, progress=False)
    assert path.read_bytes() == data
    assert server.ranges == ["bytes=100-"]
    assert not (folder / "big.zip.part").exists()

    path.unlink()
    bad = dl.Archive(archive.url, "md5:" + "0" * 32, "val2017/", "coco")
    with pytest.raises(dl.DownloadError, match="hash"):
        dl.fetch_archive(bad, folder, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == []


def test_resume_when_part_is_whole(tmp_path: Path, server: Server) -> None:
    """Invariant: a .part already holding the whole file (the server answers 416) is
    taken as it is and verified."""
    data = b"x" * 1000
    server.files["/f.zip"] = data
    (tmp_path / "f.zip.part").write_bytes(data)
    archive = dl.Archive(server.url + "/f.zip", md5(data), "", "x")
    assert dl.fetch_archive(archive, tmp_path, progress=False).read_bytes() == data


def test_download_coco_end_to_end(tmp_path: Path, server: Server, monkeypatch, capsys) -> None:
    """Invariant: download extracts only the needed members into the standard layout,
    deletes the archives, and check then passes; a rerun touches no network."""
    annotations, images = make_synthetic_coco(tmp_path / "gen", num_images=6)
    ann_zip = zip_bytes(
        {
            "annotations/instances_val2017.json": annotations.read_bytes(),
            "annotations/instances_train2017.json": b"{}",  # not needed: not extracted
        }
    )
    img_zip = zip_bytes({f"val2017/{p.name}": p.read_bytes() for p in images.iterdir()})
    server.files.update({"/ann.zip": ann_zip, "/val2017.zip": img_zip})
    monkeypatch.setitem(
        dl.ARCHIVES,
        "coco",
        (
            dl.Archive(
                server.url + "/ann.zip", md5(ann_zip), "annotations/instances_val2017.json", "coco"
            ),
            dl.Archive(server.url + "/val2017.zip", md5(img_zip), "val2017/", "coco"),
        ),
    )
    root = tmp_path / "data"
    dl.download("coco", root, progress=False)
    assert dl.check("coco", root, expected=SMALL_COCO).ok
    assert not (root / "coco" / "annotations" / "instances_train2017.json").exists()
    assert sorted(p.name for p in (root / "downloads").iterdir()) == [
        "ann.zip.done",
        "val2017.zip.done",
    ]
    monkeypatch.setattr(dl, "_probe", lambda *a: pytest.fail("probed the network"))
    dl.download("coco", root, progress=False)
    assert "coco is downloaded" in capsys.readouterr().out


def test_download_lvis_end_to_end(tmp_path: Path, server: Server, monkeypatch) -> None:
    """Invariant: LVIS download fetches the annotation archive, then each image its
    coco_url names into <root>/coco/<split>/, skipping images already there; check passes."""
    data = json.loads(json.dumps(LVIS_HANDMADE))
    for record in data["images"]:
        split, name = record["coco_url"].split("/")[-2:]
        record["coco_url"] = f"{server.url}/{split}/{name}"
        server.files[f"/{split}/{name}"] = jpeg()
    ann_zip = zip_bytes({"lvis_v1_val.json": json.dumps(data).encode()})
    server.files["/lvis_v1_val.json.zip"] = ann_zip
    archive = dl.Archive(
        server.url + "/lvis_v1_val.json.zip", md5(ann_zip), "lvis_v1_val.json", "lvis"
    )
    monkeypatch.setitem(dl.ARCHIVES, "lvis", (archive,))
    root = tmp_path / "data"
    (root / "coco" / "val2017").mkdir(parents=True)
    (root / "coco" / "val2017" / "000000000004.jpg").write_bytes(jpeg((1, 2, 3)))  # from COCO
    dl.download("lvis", root, progress=False)
    assert dl.check("lvis", root, expected=SMALL_LVIS).ok
    fetched = [r for r in server.ranges if r is None]
    assert len(fetched) == 1 + 4  # the archive, then the 4 images not already there
    assert (root / "coco" / "val2017" / "000000000004.jpg").read_bytes() == jpeg((1, 2, 3))


def test_fetch_files_reports_failures(tmp_path: Path, server: Server) -> None:
    """Invariant: files that fail are counted in one error, the others are kept, and no
    partial file is left under a final name."""
    server.files["/ok.jpg"] = jpeg()
    files = {server.url + "/ok.jpg": tmp_path / "a" / "ok.jpg",
             server.url + "/gone.jpg": tmp_path / "a" / "gone.jpg"}  # fmt: skip
    with pytest.raises(dl.DownloadError, match="1 of 2 images failed"):
        dl.fetch_files(files, progress=False)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["ok.jpg"]


# --- CLI ----------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_cli_check(tmp_path: Path, capsys, monkeypatch) -> None:
    """Invariant: `data check NAME --root DIR` exits 0 on a complete copy, 1 otherwise."""
    root = coco_tree(tmp_path)
    args = parse(["data", "check", "coco", "--root", str(root)])
    assert args.root == root
    assert args.name == "coco"
    assert args.func(args) == 1
    monkeypatch.setitem(dl.EXPECTED, "coco", SMALL_COCO)
    assert args.func(args) == 0
    assert "coco under" in capsys.readouterr().out


def test_cli_download_offline(tmp_path: Path, capsys, monkeypatch) -> None:
    """Invariant: `data download` without network exits 2 with one error line, no
    traceback; unknown dataset names are refused by argparse."""
    archive = dl.Archive("http://images.example.invalid/a.zip", "md5:0", "a", "coco")
    monkeypatch.setitem(dl.ARCHIVES, "coco", (archive,))
    assert main(["data", "download", "coco", "--root", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot download coco")
    assert "Traceback" not in err
    with pytest.raises(SystemExit):
        parse(["data", "download", "kitti"])


def test_dataset_paths_match_configs() -> None:
    """Invariant: the layout download/check use is the one configs/dataset/*.yaml point at."""
    for name in ("coco", "lvis", "nuimages"):
        data = yaml.safe_load((CONFIG_DIR / "dataset" / f"{name}.yaml").read_text())["data"]
        annotations, images = dl.dataset_paths(name, "data")
        assert (data["name"], data["annotations"], data["images"]) == (
            name,
            str(annotations),
            str(images),
        )
