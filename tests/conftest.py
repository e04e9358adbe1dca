"""Shared fixtures. The service fixtures build small real bundles (tests/bundle_factory.py) and
start the service in-process on them (tests/service_helpers.py)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fmnist_data import require_fmnist

# BentoML keeps models, bentos and temp dirs under BENTOML_HOME: keep the tests out of ~/bentoml.
_BENTOML_HOME = tempfile.mkdtemp(prefix="aegan-tests-bentoml-")
atexit.register(shutil.rmtree, _BENTOML_HOME, ignore_errors=True)
os.environ.setdefault("BENTOML_HOME", _BENTOML_HOME)
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("fmnist") is not None:
        require_fmnist()


@pytest.fixture(autouse=True)
def _access_in_force_kept() -> Iterator[None]:
    """Each service worker has one gate, whose settings /docs.json describes (aegan_serve.auth's
    ``IN_FORCE``). In this process each in-process service makes a gate of its own: a test that
    starts one with keys on must not change what a module's shared client documents."""
    import sys

    auth = sys.modules.get("aegan_serve.auth")
    kept = dict(auth.IN_FORCE) if auth is not None else None
    yield
    if auth is not None and kept is not None:
        auth.IN_FORCE.clear()
        auth.IN_FORCE.update(kept)


@pytest.fixture(scope="session")
def image_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Grey 1x28x28 images, latent_dim 32: the shape of the shipped Fashion-MNIST bundle."""
    from bundle_factory import write_bundle

    return write_bundle(tmp_path_factory.mktemp("bundles") / "grey28")


@pytest.fixture(scope="session")
def rgb_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Colour 3x16x24 images (not square), latent_dim 8, with fp16 graphs."""
    from bundle_factory import write_bundle

    return write_bundle(
        tmp_path_factory.mktemp("bundles") / "rgb16x24", shape=(3, 16, 24), latent_dim=8, fp16=True
    )


@pytest.fixture(scope="session")
def vector_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2-D vectors, latent_dim 4."""
    from bundle_factory import write_bundle

    return write_bundle(
        tmp_path_factory.mktemp("bundles") / "vec2", kind="vector", shape=(2,), latent_dim=4
    )


@pytest.fixture(scope="module")
def client(image_bundle: Path) -> Iterator:
    """The service on the grey 28x28 bundle, in-process."""
    from service_helpers import serve

    with serve(image_bundle) as test_client:
        yield test_client
