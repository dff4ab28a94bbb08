"""``retrieval eval CONFIG [key=value ...]`` and ``retrieval embed CONFIG [...]``."""

from __future__ import annotations

import argparse

from retrieval.config import load_config


def _eval(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from retrieval.engine import evaluate  # Lightning: only once a run starts

    evaluate(cfg)
    return 0


def _embed(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from retrieval.engine import embed

    embed(cfg)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``eval`` (embed then score) and ``embed`` (the embed phase alone)."""
    for name, func, text in (
        ("eval", _eval, "embed a dataset with a retriever and score it"),
        ("embed", _embed, "embed a dataset into a run folder's shards (no metrics)"),
    ):
        parser = subparsers.add_parser(name, help=text)
        parser.add_argument("config", help="experiment name in configs/ or a YAML path")
        parser.add_argument("overrides", nargs="*", help="key=value or group=name overrides")
        parser.set_defaults(func=func)
