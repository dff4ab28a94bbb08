"""Retrievers: global CLIP, Dense-CLIP, Cluster-CLIP, OWL-ViT, and plugins."""

from retrieval.retrievers.base import Retriever, max_cosine
from retrieval.retrievers.registry import (
    create_retriever,
    list_retrievers,
    register_retriever,
)

__all__ = ["Retriever", "create_retriever", "list_retrievers", "max_cosine", "register_retriever"]
