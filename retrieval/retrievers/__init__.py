"""Retrievers: global CLIP, Dense-CLIP, Cluster-CLIP, OWL-ViT, and plugins."""

from retrieval.retrievers.base import (
    Retriever,
    create_retriever,
    list_retrievers,
    max_cosine,
    register_retriever,
)

__all__ = ["Retriever", "create_retriever", "list_retrievers", "max_cosine", "register_retriever"]
