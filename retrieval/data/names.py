"""Category names -> query text (docs/protocol.md, "Category names").

Datasets name categories for machines ("bow_(weapon)", "vehicle.bus.rigid"); the text
encoder wants words ("bow", "rigid bus"). The cleaning rules are fixed per dataset so a
result is reproducible; a user mapping overrides single names where a rule reads badly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from retrieval.errors import ConfigError

DATASETS = ("coco", "lvis", "nuimages")

_PARENTHESISED = re.compile(r"\([^)]*\)")
_SPACES = re.compile(r"\s+")


def _words(text: str) -> str:
    """Underscores to spaces, runs of spaces collapsed."""
    return _SPACES.sub(" ", text.replace("_", " ")).strip()


def _clean_lvis(name: str) -> str:
    # "bow_(weapon)" -> "bow"; keep the qualifier if it is all there is.
    return _words(_PARENTHESISED.sub(" ", name)) or _words(name.replace("(", "").replace(")", ""))


def _clean_nuimages(name: str) -> str:
    # Drop the super-category, then most specific part first:
    # "human.pedestrian.adult" -> "adult pedestrian"; "animal" stays "animal".
    parts = name.split(".")
    kept = parts[1:] if len(parts) > 1 else parts
    return _words(" ".join(reversed(kept)))


def clean_category_name(name: str, dataset: str) -> str:
    """The query text for one raw category name, by the dataset's rule.

    Args:
        name: the dataset's own name (LVIS: ``synonyms[0]`` or ``name``).
        dataset: ``coco`` (and any COCO-format folder: names unchanged), ``lvis`` or
            ``nuimages``.

    Raises:
        ValueError: an unknown dataset (a silent default would change the queries).
    """
    if dataset == "coco":
        return name
    if dataset == "lvis":
        return _clean_lvis(name)
    if dataset == "nuimages":
        return _clean_nuimages(name)
    raise ConfigError(
        f"no name-cleaning rule for dataset {dataset!r}; known: {', '.join(DATASETS)}"
    )


def query_name(name: str, dataset: str, mapping: Mapping[str, str] | None = None) -> str:
    """The query text for ``name``: the user's mapping if it names it, else the rule.

    Args:
        name: the dataset's raw category name.
        dataset: as for :func:`clean_category_name`.
        mapping: raw name -> query text (config ``data.query_names``), for names the
            rule renders badly ("movable_object.trafficcone" -> "traffic cone").
    """
    if mapping and name in mapping:
        return mapping[name]
    return clean_category_name(name, dataset)
