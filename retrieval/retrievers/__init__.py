"""Retrievers: global CLIP, Dense-CLIP, Cluster-CLIP, OWL-ViT, and plugins."""

from retrieval.factory import (
    create_retriever,
    list_retrievers,
    register_retriever,
)
from retrieval.retrievers.base import Retriever, max_cosine

__all__ = ["Retriever", "create_retriever", "list_retrievers", "max_cosine", "register_retriever"]
