"""Checkpoint -> ONNX model bundle: graph export, parity checks, fp16 variants, manifest.

``export_bundle(source, out)`` is the entry point (``aegan export`` on the command line). Imports
are lazy so that ``aegan --help`` does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from export.bundle_writer import export_bundle, store_in_bentoml
    from export.onnx_export import ExportError, ParityError

__all__ = ["ExportError", "ParityError", "export_bundle", "store_in_bentoml"]


def __getattr__(name: str) -> Any:
    if name in ("export_bundle", "store_in_bentoml"):
        from export import bundle_writer

        return getattr(bundle_writer, name)
    if name in ("ExportError", "ParityError"):
        from export import onnx_export

        return getattr(onnx_export, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
