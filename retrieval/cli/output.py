"""What the command line prints besides its own results: plain by default, everything
with ``retrieval -v``.

By default a command shows the project's messages and third-party warnings and errors,
once each; not Lightning's start-up banner (accelerator lines, its LitLogger advert),
nor deprecation notices addressed to the developers of libraries the project uses. With
``-v`` all of them come back, each line once.
"""

from __future__ import annotations

import logging
import warnings

# loggers a library gives its own handler: each line would print twice through ours
LIBRARY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
DEVELOPER_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def configure(verbose: bool) -> None:
    """Logging through one handler (``retrieval`` at INFO, others at WARNING; all at INFO
    with ``verbose``) and developer warnings hidden unless ``verbose``."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("retrieval").setLevel(logging.INFO)
    if not verbose:
        for category in DEVELOPER_WARNINGS:
            warnings.filterwarnings("ignore", category=category)


def follow_libraries(verbose: bool) -> None:
    """Routes the loggers Lightning sets up when imported (each with its own handler)
    through ours; called by the commands that run Lightning (eval, embed, sweep)."""
    import lightning.pytorch  # noqa: F401 - its import adds the handlers removed here

    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.INFO if verbose else logging.WARNING)
