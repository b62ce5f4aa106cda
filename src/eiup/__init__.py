"""eiup: training-free erasure of concepts in diffusers Stable Diffusion pipelines (EIUP, arXiv 2408.01014).

Public API (imported lazily, so ``import eiup`` stays fast)::

    from eiup import EIUPPipeline, EIUPXLPipeline, from_pipe, EraseConfig
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "EIUPPipeline": "pipeline",
    "EIUPXLPipeline": "pipeline",
    "EIUPPipelineOutput": "pipeline",
    "EraseConfig": "config",
    "EraseConfigError": "config",
    "from_pipe": "pipeline",
    "DEFAULT_ERASE_SCALE": "config",
    "DEFAULT_ERASE_MODE": "config",
    "ERASE_MODES": "config",
    "ConceptAttentionRecorder": "attention",
    "EraseContext": "attention",
    "concept_term": "attention",
    "tiny_pipeline": "testing",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .attention import ConceptAttentionRecorder, EraseContext, concept_term
    from .config import DEFAULT_ERASE_MODE, DEFAULT_ERASE_SCALE, ERASE_MODES, EraseConfig, EraseConfigError
    from .pipeline import EIUPPipeline, EIUPPipelineOutput, EIUPXLPipeline, from_pipe
    from .testing import tiny_pipeline


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
