"""The AEGAN core: what training, export, batch jobs and the service share.

The bundle format and its manifest, pixels and uploads, latent maths, crash-safe files, the ONNX
Runtime sessions and the one GPU check, and the user-error base. It imports numpy, Pillow, ONNX
Runtime and pydantic; never torch and never a web framework (tests/test_layering.py holds that).
"""
