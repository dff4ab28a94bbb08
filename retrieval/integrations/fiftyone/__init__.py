"""FiftyOne: a run as a dataset and an index as that dataset's text search.

Needs the ``fiftyone`` extra (``pip install '.[fiftyone]'``, docs/fiftyone.md). Importing
this package does not import FiftyOne; each call does, and says how to install it when
it is missing.
"""

from retrieval.integrations.fiftyone.dataset import (
    GROUND_TRUTH_FIELD,
    ID_FIELD,
    REPS_FIELD,
    ExportedDataset,
    export_dataset,
    register_index,
)

__all__ = [
    "GROUND_TRUTH_FIELD",
    "ID_FIELD",
    "REPS_FIELD",
    "ExportedDataset",
    "export_dataset",
    "register_index",
]
