"""Independent references the tests compare against, written straight from docs/protocol.md."""

from __future__ import annotations

import math


def reference_ap(scores, relevant, ignore=None, image_ids=None, top_k=None, normalize="min_k_p"):
    """AP@K of one query, looped straight from docs/protocol.md.

    Ignored images are dropped before ranking; ties go to the smaller image id;
    ``AP@K = 1/min(K, P) * sum over relevant r_k, k <= K, of precision@k`` ("hits":
    divide by the relevant images found in the top K). NaN when P == 0.
    """
    n = len(scores)
    ignore = [False] * n if ignore is None else ignore
    image_ids = list(range(n)) if image_ids is None else image_ids
    kept = [i for i in range(n) if not ignore[i]]
    ranked = sorted(kept, key=lambda i: (-float(scores[i]), int(image_ids[i])))
    positives = sum(bool(relevant[i]) for i in kept)
    if positives == 0:
        return math.nan
    k = len(ranked) if top_k is None else top_k
    hits, total = 0, 0.0
    for position, i in enumerate(ranked[:k], start=1):
        if relevant[i]:
            hits += 1
            total += hits / position
    return total / (min(k, positives) if normalize == "min_k_p" else max(hits, 1))
