"""Dataset set-up: fetch COCO and LVIS, explain nuImages, and check a local copy.

Everything lives under one root (default ``data/``), in the layout the configs in
``configs/dataset/`` point at::

    <root>/coco/annotations/instances_val2017.json   COCO val2017 ground truth
    <root>/coco/val2017/                             COCO val2017 images (5,000)
    <root>/coco/train2017/                           only the LVIS v1 val images COCO
                                                     keeps in train2017
    <root>/lvis/lvis_v1_val.json                     LVIS v1 val ground truth
    <root>/nuimages/v1.0-val/                        nuImages tables (category.json ...)
    <root>/nuimages/samples/CAM_*/                   nuImages key frames

Archives are fetched with pooch: checksum verified (the MD5 / SHA256 of the official
files, below), resumed where a connection broke (HTTP range requests on a ``.part``
file), extracted, then deleted; a ``<root>/downloads/<archive>.done`` marker makes a
rerun skip them. LVIS v1 val takes most of its images from COCO train2017; rather
than the 18 GB train2017 archive, the images it uses are fetched one by one from their
``coco_url`` (COCO publishes no per-file checksums: each file is checked against its
HTTP length, written under a temporary name and renamed, so a rerun fetches only what
is missing). nuImages needs a licence click-through: :func:`download` prints the steps.

Before fetching anything the host is probed with a short socket timeout, so a machine
without network fails at once with the fix, not after minutes of retries.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from retrieval.errors import ConfigError, RetrievalError

DATASETS = ("coco", "lvis", "nuimages")
DEFAULT_ROOT = Path("data")
PROBE_TIMEOUT_S = 3.0
CHUNK = 1 << 20


class DownloadError(RetrievalError, RuntimeError):
    """A download that cannot go on (no network, a file that keeps failing); the message
    says what to do."""


@dataclass(frozen=True)
class Archive:
    """One official archive and the part of it the benchmark needs.

    Attributes:
        url: where it is published.
        known_hash: pooch's ``"md5:..."`` / ``"sha256:..."``.
        members: extract only zip members whose name starts with this.
        dest: folder under the root the members are extracted into.
    """

    url: str
    known_hash: str
    members: str
    dest: str

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# Hashes of the official files. COCO's MD5s are the ones every COCO loader checks
# (torchvision-style dataset classes, TFDS-era scripts); LVIS's SHA256 is recorded by
# two unrelated public download scripts. A mismatch stops the download (see fetch_archive).
ARCHIVES: dict[str, tuple[Archive, ...]] = {
    "coco": (
        Archive(
            "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
            "md5:f4bbac642086de4f52a3fdda2de5fa2c",
            "annotations/instances_val2017.json",
            "coco",
        ),
        Archive(
            "http://images.cocodataset.org/zips/val2017.zip",
            "md5:442b8da7639aecaf257c1dceb8ba8c80",
            "val2017/",
            "coco",
        ),
    ),
    "lvis": (
        Archive(
            "https://dl.fbaipublicfiles.com/LVIS/lvis_v1_val.json.zip",
            "sha256:5cae9a3c79aadb667550c2b5dcf7f4d86e059a41ec91ef690225b667e28e9ba5",
            "lvis_v1_val.json",
            "lvis",
        ),
    ),
}

PATHS = {
    "coco": ("coco/annotations/instances_val2017.json", "coco/val2017"),
    "lvis": ("lvis/lvis_v1_val.json", "coco"),
    "nuimages": ("nuimages/v1.0-val", "nuimages"),
}
"""Dataset -> (``data.annotations``, ``data.images``) relative to the root."""

EXPECTED: dict[str, dict[str, int]] = {
    "coco": {"images": 5000, "categories": 80},
    "lvis": {"images": 19809, "categories": 1203, "rare": 337, "common": 461, "frequent": 405},
    # nuImages v1.0: 93,476 key frames = train 67,279 + val 16,445 + test 9,752 (the
    # nuImages paper and site); 23 object classes (nuScenes' classes; vehicle.ego and
    # flat.driveable_surface are surface classes and no queries).
    "nuimages": {"images": 16445, "categories": 23},
}
"""What a complete copy of each benchmark split holds."""

NUIMAGES_STEPS = """\
nuImages is not downloaded automatically: its licence (CC BY-NC-SA 4.0, non-commercial)
must be accepted by each user on the nuScenes website.

  1. Sign up / log in at https://www.nuscenes.org/sign-up and accept the terms of use.
  2. On https://www.nuscenes.org/nuimages#download, under "nuImages", download
       nuimages-v1.0-all-metadata.tgz   (the tables of every split, v1.0-val included)
       nuimages-v1.0-all-samples.tgz    (the key-frame images; sweeps are not needed)
  3. Extract both into {dest}:
       mkdir -p {dest}
       tar -xzf nuimages-v1.0-all-metadata.tgz -C {dest}
       tar -xzf nuimages-v1.0-all-samples.tgz -C {dest}
     so that {dest}/v1.0-val/sample_data.json and {dest}/samples/CAM_FRONT/ exist.
  4. Verify: retrieval data check nuimages --root {root}
"""


def dataset_paths(name: str, root: str | Path = DEFAULT_ROOT) -> tuple[Path, Path]:
    """``(data.annotations, data.images)`` of ``name`` in the standard layout under ``root``."""
    _check_name(name)
    annotations, images = PATHS[name]
    return Path(root) / annotations, Path(root) / images


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


# --- network --------------------------------------------------------------------------


def _endpoint(url: str) -> tuple[str, int]:
    """The host and port a request for ``url`` connects to first (its proxy, if one is set)."""
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    default_port = 443 if parts.scheme == "https" else 80
    return parts.hostname or "", parts.port or default_port


def _probe(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection opens within ``timeout``, else why not.

    Runs in a daemon thread so a resolver that hangs cannot hold the caller longer
    than ``timeout`` either.
    """
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except OSError as err:
            outcome.append(str(err) or type(err).__name__)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def require_network(urls: Iterable[str], what: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fails at once, with the way out, when a host of ``urls`` cannot be reached.

    Raises:
        DownloadError: naming the host, the reason and what to do instead.
    """
    for host, port in dict.fromkeys(_endpoint(url) for url in urls):
        reason = _probe(host, port, timeout)
        if reason is not None:
            raise DownloadError(
                f"cannot download {what}: {host}:{port} is unreachable ({reason}). This "
                "machine seems to have no network access. Run the download on a machine "
                "that has, copy the data folder here, and verify it with `retrieval data "
                "check NAME --root DIR`."
            )


# --- archives ---------------------------------------------------------------------------


class ResumableDownload:
    """A pooch downloader that continues a broken download instead of starting over.

    Bytes go to a fixed ``.part`` file; a rerun asks the server for the rest (HTTP
    ``Range``) and starts over only when the server ignores the range. pooch then
    checks the hash of the whole file.
    """

    def __init__(self, part: Path, progress: bool = True, timeout: float = 60.0) -> None:
        self.part = part
        self.progress = progress
        self.timeout = timeout

    def __call__(self, url: str, output_file: str, pooch: Any) -> None:
        from tqdm.auto import tqdm

        start = self.part.stat().st_size if self.part.exists() else 0
        headers = {"Range": f"bytes={start}-"} if start else {}
        try:
            response = urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=self.timeout
            )
        except urllib.error.HTTPError as err:
            if err.code == 416 and start:  # nothing left to send: the part is whole
                os.replace(self.part, output_file)
                return
            raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
        except OSError as err:
            raise DownloadError(f"{url}: {err}; rerun to resume") from None
        with response:
            if start and response.status != 206:
                start = 0  # the server sent the whole file
            length = response.headers.get("Content-Length")
            total = start + int(length) if length is not None else None
            with (
                self.part.open("ab" if start else "wb") as out,
                tqdm(
                    total=total,
                    initial=start,
                    unit="B",
                    unit_scale=True,
                    desc=self.part.name.removesuffix(".part"),
                    disable=not self.progress,
                ) as bar,
            ):
                try:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
                except OSError as err:
                    raise DownloadError(f"{url}: {err}; rerun to resume") from None
        size = self.part.stat().st_size
        if total is not None and size != total:
            raise DownloadError(
                f"{url}: the connection closed after {size} of {total} bytes; rerun to resume"
            )
        os.replace(self.part, output_file)


def fetch_archive(archive: Archive, folder: Path, progress: bool = True) -> Path:
    """Downloads ``archive`` into ``folder`` (resuming a ``.part``), checksum verified.

    A file already there with the right hash is not fetched again.

    Raises:
        DownloadError: the transfer failed, or the file's hash is not the known one.
    """
    import pooch

    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f"{archive.file_name}.part"
    try:
        path = pooch.retrieve(
            archive.url,
            known_hash=archive.known_hash,
            fname=archive.file_name,
            path=folder,
            downloader=ResumableDownload(part, progress),
        )
    except ValueError as err:  # pooch's hash mismatch; the bad file is already deleted
        raise DownloadError(
            f"{archive.url}: {err} Rerun to fetch it again; if it keeps failing, the "
            "published file changed: please report it."
        ) from None
    return Path(path)


def extract(zip_path: Path, members: str, dest: Path) -> int:
    """Extracts the members starting with ``members`` into ``dest``; returns how many.

    A member already on disk with its full size is skipped, so an interrupted
    extraction continues where it stopped.
    """
    count = 0
    with zipfile.ZipFile(zip_path) as archive:
        for info in archive.infolist():
            if info.is_dir() or not info.filename.startswith(members):
                continue
            target = dest / info.filename
            if not (target.is_file() and target.stat().st_size == info.file_size):
                archive.extract(info, dest)
            count += 1
    if not count:
        raise DownloadError(f"{zip_path} holds no member {members!r}: not the expected archive")
    return count


def _install(archive: Archive, root: Path, progress: bool) -> None:
    """Fetch, verify, extract, delete the archive, leave the marker."""
    downloads = root / "downloads"
    zip_path = fetch_archive(archive, downloads, progress)
    count = extract(zip_path, archive.members, root / archive.dest)
    (downloads / f"{archive.file_name}.done").write_text(f"{archive.known_hash}\n{count}\n")
    zip_path.unlink()
    print(f"  {archive.file_name}: {count} files -> {root / archive.dest}")


def _pending(name: str, root: Path) -> list[Archive]:
    return [a for a in ARCHIVES[name] if not (root / "downloads" / f"{a.file_name}.done").is_file()]


# --- LVIS images --------------------------------------------------------------------


def lvis_image_files(annotations: Path, images_root: Path) -> dict[str, Path]:
    """``coco_url -> local file`` (``<images_root>/<split>/<file>``) of every LVIS image.

    Raises:
        DownloadError: a ``coco_url`` that is not http(s), or whose split and file name
            would put the file outside ``images_root`` (``..``, an empty name).
    """
    with annotations.open("rb") as f:
        records = json.load(f)["images"]
    files = {}
    root = images_root.resolve()
    for record in records:
        url = record["coco_url"]
        _require_http(url, annotations)
        split, name = (["", *url.rstrip("/").split("/")])[-2:]
        target = images_root / split / name
        if (
            split in ("", ".", "..")
            or name in ("", ".", "..")
            or not (target.resolve().is_relative_to(root))
        ):
            raise DownloadError(
                f"{annotations}: coco_url {url!r} does not end in <split>/<file>, so its "
                f"image would be written outside {images_root}; fix the entry (LVIS v1 uses "
                ".../train2017/<file> and .../val2017/<file>)"
            )
        files[url] = target
    return files


def _require_http(url: Any, source: str | Path) -> None:
    """Only http(s) URLs are fetched: never ``file://``, ``ftp://`` or a bare path."""
    scheme = urlsplit(url).scheme.lower() if isinstance(url, str) else ""
    if scheme not in ("http", "https"):
        raise DownloadError(
            f"{source}: refusing to fetch {url!r}: only http:// and https:// URLs are "
            "downloaded; fix the entry"
        )


def fetch_file(url: str, target: Path, timeout: float = 60.0) -> None:
    """One file, written whole or not at all (temporary name, length checked, renamed).

    Raises:
        DownloadError: ``url`` is not http(s).
    """
    _require_http(url, "download")
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data = response.read()
        length = response.headers.get("Content-Length")
    if length is not None and len(data) != int(length):
        raise OSError(f"got {len(data)} of {length} bytes")
    part.write_bytes(data)
    os.replace(part, target)


def fetch_files(files: Mapping[str, Path], progress: bool = True, workers: int = 8) -> None:
    """Fetches every ``url -> path``, ``workers`` at a time.

    Raises:
        DownloadError: some files failed (the others are kept; a rerun retries those).
    """
    from tqdm.auto import tqdm

    failed: dict[str, str] = {}

    def one(item: tuple[str, Path]) -> None:
        try:
            fetch_file(*item)
        except OSError as err:
            failed[item[0]] = str(err)

    with (
        ThreadPoolExecutor(workers) as pool,
        tqdm(total=len(files), unit="img", desc="images", disable=not progress) as bar,
    ):
        for _ in pool.map(one, files.items()):
            bar.update()
    if failed:
        url, reason = next(iter(failed.items()))
        raise DownloadError(
            f"{len(failed)} of {len(files)} images failed (e.g. {url}: {reason}); the others "
            "are saved, rerun to fetch the rest"
        )


# --- entry points ---------------------------------------------------------------------


def download(name: str, root: str | Path = DEFAULT_ROOT, progress: bool = True) -> Path:
    """Fetches dataset ``name`` into the standard layout under ``root``.

    ``coco``: val2017 images and ``instances_val2017.json``. ``lvis``: the v1 val
    annotations and the COCO images they use (val2017 and part of train2017).
    ``nuimages``: prints the manual steps (a licence must be accepted) and fetches
    nothing. A rerun finishes an interrupted download and fetches nothing once complete.

    Returns:
        The root.

    Raises:
        DownloadError: no network (found within seconds), a failed transfer or a
            checksum mismatch.
    """
    _check_name(name)
    root = Path(root)
    if name == "nuimages":
        print(NUIMAGES_STEPS.format(dest=root / "nuimages", root=root))
        return root
    pending = _pending(name, root)
    if pending:
        require_network([a.url for a in pending], name)
    for archive in pending:
        _install(archive, root, progress)
    if name == "lvis":
        annotations, images = dataset_paths("lvis", root)
        files = lvis_image_files(annotations, images)
        missing = {url: path for url, path in files.items() if not path.is_file()}
        if missing:
            require_network(list(missing)[:1], "the LVIS images")
            print(f"  fetching {len(missing)} of {len(files)} LVIS images into {images}")
            fetch_files(missing, progress)
    annotations, images = dataset_paths(name, root)
    print(
        f"{name} is downloaded under {root}. Verify: retrieval data check {name} --root {root}\n"
        f"Config: data.name={name} data.annotations={annotations} data.images={images}"
    )
    return root


@dataclass
class CheckReport:
    """The outcome of :func:`check`: one line per fact, each passed or failed."""

    name: str
    root: Path
    lines: list[tuple[bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(passed for passed, _ in self.lines)

    def add(self, passed: bool, text: str) -> bool:
        self.lines.append((passed, text))
        return passed

    def __str__(self) -> str:
        verdict = "complete" if self.ok else "NOT complete"
        body = [f"  [{'ok' if passed else 'FAIL'}] {text}" for passed, text in self.lines]
        return "\n".join([f"{self.name} under {self.root}: {verdict}", *body])


def _open_dataset(name: str, annotations: Path, images: Path) -> Any:
    """The dataset as an evaluation would build it, missing files listed, not raised."""
    from retrieval.data.base import create_dataset

    return create_dataset(name, annotations=annotations, images=images, on_bad_image="skip")


def check(
    name: str,
    root: str | Path = DEFAULT_ROOT,
    expected: Mapping[str, int] | None = None,
    echo: bool = True,
) -> CheckReport:
    """Verifies a local copy of ``name`` in the standard layout, and prints the report.

    Loads it the way an evaluation does (so whatever loads here loads there), then
    compares image and category counts with a complete split's and checks that every
    image file is present (present, not decoded: an unreadable file shows up in a run
    with ``data.on_bad_image=skip``).

    Args:
        name: ``coco``, ``lvis`` or ``nuimages``.
        root: the data root (see the module docstring for the layout).
        expected: counts to compare with (keys ``images``, ``categories`` and, for
            LVIS, ``rare``/``common``/``frequent``); default :data:`EXPECTED`, the
            full split. Pass your own for a subset.
        echo: print the report.
    """
    annotations, images = dataset_paths(name, root)
    expected = dict(EXPECTED[name] if expected is None else expected)
    report = CheckReport(name, Path(root))
    fix = f"run `retrieval data download {name} --root {root}`"
    if report.add(annotations.exists(), f"annotations {annotations}"):
        try:
            dataset = _open_dataset(name, annotations, images)
        except (OSError, ValueError) as err:
            report.add(False, f"cannot load it: {err}")
        else:
            _check_counts(report, dataset, expected)
    else:
        report.add(False, f"missing; {fix}" if name != "nuimages" else "missing; see below")
    if echo:
        print(report)
        if not report.ok and name == "nuimages":
            print(NUIMAGES_STEPS.format(dest=Path(root) / "nuimages", root=root))
        elif not report.ok:
            print(f"To fix: {fix} (it resumes and skips what is already there).")
    return report


def _check_counts(report: CheckReport, dataset: Any, expected: Mapping[str, int]) -> None:
    listed = len(dataset.image_ids) + len(dataset.failures_at_start)
    report.add(
        listed == expected["images"], f"images listed: {listed} (expected {expected['images']})"
    )
    count = len(dataset.categories)
    report.add(
        count == expected["categories"], f"categories: {count} (expected {expected['categories']})"
    )
    for split in ("rare", "common", "frequent"):
        if split in expected:
            n = sum(c.split == split for c in dataset.categories)
            report.add(
                n == expected[split], f"{split} categories: {n} (expected {expected[split]})"
            )
    missing = dataset.failures_at_start
    text = f"image files present: {listed - len(missing)} of {listed}"
    if missing:
        text += "; missing e.g. " + ", ".join(f["path"] for f in missing[:3])
    report.add(not missing, text)
