"""The explorer page's files are served by the service itself (the page in a browser:
tests/test_ui_browser.py)."""

from __future__ import annotations

import re

from aegan_serve.ui import STATIC_DIR


def test_ui_is_served_under_ui_by_the_service(client):
    page = client.get("/ui", follow_redirects=False)
    assert page.status_code in (301, 307) and page.headers["location"].endswith("/ui/")
    html = client.get("/ui/")
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert 'src="app.js"' in html.text and 'href="style.css"' in html.text
    assert "javascript" in client.get("/ui/app.js").headers["content-type"]
    assert client.get("/ui/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/ui/missing.js").status_code == 404
    assert client.post("/info").status_code == 200  # the API is still where it was


def test_page_loads_nothing_from_other_hosts():
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"(https?:)?//(?!www\.w3\.org/2000/svg)[\w.-]+\.\w", text), path


def test_page_calls_only_public_endpoints():
    script = (STATIC_DIR / "app.js").read_text()
    called = set(re.findall(r'call\("([\w/]+)"', script))
    assert called == {
        "info",
        "generate",
        "decode",
        "reconstruct",
        "interpolate",
        "similar",
        "gallery/image",
    }


def test_packaging_carries_the_page():
    root = STATIC_DIR.parents[1]
    assert '"aegan_serve/static/*"' in (root / "bentofile.yaml").read_text()
    assert 'aegan_serve = ["static/*"]' in (root / "pyproject.toml").read_text()
    assert "COPY aegan_serve/ aegan_serve/" in (root / "Dockerfile").read_text()
