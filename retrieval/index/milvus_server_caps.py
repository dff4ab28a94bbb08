"""What a Milvus engine can do, decided from the version it reports.

The same client code talks to engines that differ in what they honour, and the worst
differences are silent. A Milvus 2.3 server (2.3.5, measured) accepts ``group_by_field``
and ignores it: a grouped search returns one image many times. It accepts a
``FLOAT16_VECTOR`` field too, but building an HNSW or IVF_FLAT index over one hangs
(``create_index`` never finishes), and FLAT over fp16 answers batched queries wrongly
and differently from call to call (measured: results/bench/search_cpu.md). So the
milvus backend asks the engine its version at build and at open and picks from it:

==========================  ==========  =================================  ============
engine                      group-by    fp16 vectors with                  tested here
==========================  ==========  =================================  ============
Milvus server < 2.4         no          none (see above)                   2.3.5
Milvus server >= 2.4        yes         FLAT, IVF_FLAT, HNSW, AUTOINDEX    no
milvus-lite 3.x             yes         none (pure Python, float32 only)   3.2.2
milvus-lite 2.5.x           yes         FLAT, IVF_FLAT                     no
other milvus-lite           no          none                               no
unparsable server version   no          none                               no
==========================  ==========  =================================  ============

Without group-by the backend groups by image itself (over-fetch, see
:mod:`retrieval.index.milvus_backend`), which is correct everywhere, so an unknown
engine gets the safe choices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GROUP_BY_SINCE = (2, 4)  # Milvus server releases that honour group_by_field
FP16_ALL = frozenset({"FLAT", "IVF_FLAT", "HNSW", "AUTOINDEX"})
FP16_LITE_2_5 = frozenset({"FLAT", "IVF_FLAT"})


@dataclass(frozen=True)
class Capabilities:
    """What an engine honours.

    Attributes:
        engine: what it is and the version it reported, for messages and the manifest.
        group_by: whether a search's ``group_by_field`` groups (else it is ignored).
        fp16_indexes: index types that take a ``FLOAT16_VECTOR`` field.
    """

    engine: str
    group_by: bool
    fp16_indexes: frozenset[str]


def parse_version(text: str) -> tuple[int, int] | None:
    """``(major, minor)`` of the first ``X.Y`` in a reported version (``v2.3.5-lite``)."""
    found = re.search(r"(\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else None


def server_capabilities(reported: str) -> Capabilities:
    """A Milvus server's, from ``get_server_version()`` (2.3.5 reports ``v2.3.5-lite``:
    the PyPI ``milvus`` package's standalone server, not milvus-lite)."""
    version = parse_version(reported)
    engine = f"Milvus server {reported}"
    if version is not None and version >= GROUP_BY_SINCE:
        return Capabilities(engine, True, FP16_ALL)
    return Capabilities(engine, False, frozenset())


def lite_capabilities(package_version: str) -> Capabilities:
    """milvus-lite's, from its package version (it reports no server version of note)."""
    version = parse_version(package_version)
    engine = f"milvus-lite {package_version}"
    if version is not None and version >= (3, 0):
        return Capabilities(engine, True, frozenset())
    if version is not None and version >= (2, 5):
        return Capabilities(engine, True, FP16_LITE_2_5)
    return Capabilities(engine, False, frozenset())
