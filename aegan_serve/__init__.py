"""aegan-serve: serve an AEGAN generator and encoder (ONNX) over HTTP with BentoML."""

__version__ = "0.1.0"
