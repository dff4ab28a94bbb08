"""Errors a user can cause and fix: bad config, data, weights or index files.

Every one of them is a :class:`RetrievalError`, and its message names the key or file
and the fix. The CLI prints these as one ``error:`` line (exit status 2); anything else
is a bug and keeps its traceback. Each class also derives from the built-in error of its
kind (``ValueError``, ``FileNotFoundError``) so plain Python code can catch it the usual
way. The two helpers at the end write what such messages share: the closest valid name,
and which stored settings differ from the wanted ones.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from typing import Any


class RetrievalError(Exception):
    """Base of every user-caused error; the message says what to change."""


class ConfigError(RetrievalError, ValueError):
    """A configuration key or option value that cannot work (names the key and the fix)."""


class DataError(RetrievalError, ValueError):
    """Annotations or image lists that are malformed or inconsistent (names the entry)."""


class MissingFileError(RetrievalError, FileNotFoundError):
    """A file or folder the user pointed at does not exist (names it and what to pass)."""


class WeightsNotFoundError(MissingFileError):
    """Pretrained weights are neither cached nor downloadable; the message says how to fix."""


class StoreError(RetrievalError, ValueError):
    """Stored embeddings (a run folder's shards) that cannot be used as they are."""


class IndexFileError(RetrievalError, ValueError):
    """An index that cannot be used as it is (corrupt, empty, mismatched); says the fix."""


def did_you_mean(key: str, options: Iterable[str], cutoff: float = 0.6) -> str:
    """`` Did you mean 'x'?`` for the closest of ``options``, or an empty string."""
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=cutoff)
    return f" Did you mean {close[0]!r}?" if close else ""


def differences(
    stored: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """Every dotted key whose value differs between two nested settings mappings, as
    ``"key: stored X, now Y"`` lines. Both sides are compared as JSON would store them
    (tuples as lists, paths as strings), since the stored side comes back from a file."""
    return _differences(_as_json(stored), _as_json(wanted), prefix)


def _differences(stored: Any, wanted: Any, prefix: str) -> list[str]:
    lines = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: stored {a!r}, now {b!r}")
    return lines


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))
