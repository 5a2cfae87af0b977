"""ohlora-rag: an offline ML-tutor question-answering system (S-BERT retrieval + Faiss + a LoRA-tuned LLM).

Public API (imported lazily so that `ohlora-rag --help` stays instant)::

    from ohlora_rag import build_index, Retriever, IndexConfig, SearchConfig, Paths
    build_index(IndexConfig(db="data/concepts.csv"))
    Retriever.load().search("What is cosine similarity?", top_k=3)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Paths": "config",
    "IndexConfig": "config",
    "SearchConfig": "config",
    "OhloraError": "errors",
    "DataFormatError": "errors",
    "IndexNotFoundError": "errors",
    "IndexMismatchError": "errors",
    "ModelNotFoundError": "errors",
    "UsageError": "errors",
    "configure_threads": "device",
    "load_concepts": "data",
    "ConceptDB": "data",
    "Encoder": "encoder",
    "resolve": "models",
    "choose_encoder": "models",
    "VectorIndex": "store",
    "load_index": "store",
    "build_index": "build",
    "Retriever": "retriever",
    "Hit": "retriever",
    "SearchResult": "retriever",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'ohlora_rag' has no attribute {name!r}")
