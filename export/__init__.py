"""Checkpoint -> ONNX model bundle: graph export, parity checks, fp16 variants, manifest.

:func:`export.bundle_writer.export_bundle` is the entry point (``aegan export`` on the command
line); :mod:`export.directions` adds latent directions to a bundle.
"""
