"""The latent explorer: a static page (HTML, CSS, plain JavaScript) at ``/ui``, served by the
service itself, so it shares the API's process, port and origin.

The page has no build step and loads nothing from the internet: everything it needs is in
``aegan_serve/static/``. It calls only the public endpoints (/info, /generate, /decode,
/reconstruct, /interpolate), exactly as any other client would. Why a static page rather than a
Gradio app: docs/SERVING.md ("The latent explorer").
"""

from __future__ import annotations

from pathlib import Path

from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

UI_PATH = "/ui"
STATIC_DIR = Path(__file__).with_name("static")


def ui_app() -> ASGIApp:
    """The page's files; ``/ui/`` answers ``index.html``."""
    return StaticFiles(directory=STATIC_DIR, html=True)
