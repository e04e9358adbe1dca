"""``POST /similar`` and ``POST /gallery/image`` (``AEGAN_GALLERY``, ``AEGAN_GALLERY_ROOT``),
in-process: each concurrent client gets its own neighbours, neighbours' pictures decoded or as
their original files (never a file outside the root), and every bad request a 4xx naming it."""

from __future__ import annotations

import base64
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from service_helpers import (
    ServerExited,
    bentoml_serve,
    decode_png,
    error_of,
    files,
    image_bytes,
    serve,
)
from test_gallery import PICTURES, encode_to, make_collection

from aegan_batch.index import build_gallery
from aegan_core.bundle import load_bundle

pytest.importorskip("pyarrow.parquet", reason="the 'batch' extra (pyarrow) is not installed")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_collection(tmp_path_factory.mktemp("pictures"))


@pytest.fixture(scope="module")
def gallery(pictures: Path, image_bundle: Path, tmp_path_factory) -> Path:
    dest = encode_to(pictures, image_bundle, tmp_path_factory.mktemp("gallery") / "out")
    build_gallery(dest, load_bundle(image_bundle))
    return dest


@pytest.fixture(scope="module")
def client(image_bundle: Path, gallery: Path, pictures: Path):
    with serve(image_bundle, AEGAN_GALLERY=str(gallery), AEGAN_GALLERY_ROOT=str(pictures)) as c:
        yield c


def names(pictures: Path) -> list[str]:
    return sorted(p.relative_to(pictures).as_posix() for p in pictures.rglob("group-*/*.png"))


def similar(client, name: str, pictures: Path, k: int | None = None):
    data = {} if k is None else {"k": str(k)}
    return client.post("/similar", files=files((pictures / name).read_bytes()), data=data)


def test_an_upload_finds_itself_first_and_latents_answer_the_same(client, pictures):
    name = names(pictures)[7]
    body = similar(client, name, pictures).json()
    assert len(body["results"]) == 1 and len(body["results"][0]) == 10  # k defaults to 10
    first, *rest = body["results"][0]
    assert first["id"] == name and first["distance"] == pytest.approx(0, abs=1e-4)
    distances = [n["distance"] for n in body["results"][0]]
    assert distances == sorted(distances) and rest[0]["distance"] > 0
    latent = client.post("/encode", files=files((pictures / name).read_bytes())).json()["latents"]
    by_latent = client.post("/similar", json={"latents": latent * 2, "k": 10}).json()
    assert by_latent["results"] == [body["results"][0]] * 2
    assert len(
        client.post("/similar", json={"latents": latent, "k": 100}).json()["results"][0]
    ) == (PICTURES)


def test_concurrent_clients_each_get_their_own_neighbours(client, pictures):
    chosen = names(pictures)[:12]
    answers: dict[str, list] = {}

    def ask(name: str) -> None:
        answers[name] = similar(client, name, pictures, k=3).json()["results"]

    threads = [threading.Thread(target=ask, args=(n,)) for n in chosen for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in chosen:
        assert answers[name][0][0]["id"] == name, (name, answers[name])


def test_a_neighbours_picture_decoded_and_original(client, pictures):
    name = names(pictures)[3]
    latent = client.post("/encode", files=files((pictures / name).read_bytes())).json()["latents"]
    decoded = client.post("/gallery/image", json={"id": name})
    assert decoded.status_code == 200 and decoded.headers["content-type"] == "image/png"
    expected = client.post("/decode", json={"latents": latent}).json()["images"][0]
    np.testing.assert_array_equal(
        decode_png(decoded.content), decode_png(base64.b64decode(expected))
    )
    original = client.post("/gallery/image", json={"id": name, "source": "original"})
    assert original.status_code == 200 and original.headers["content-type"] == "image/png"
    assert original.content == (pictures / name).read_bytes()


def test_info_reports_the_gallery(client, gallery, image_bundle):
    info = client.post("/info").json()["gallery"]
    assert info["size"] == PICTURES and info["kind"] == "exact" and info["skipped"] == 1
    assert info["path"] == str(gallery) and info["originals"] is True
    assert (
        info["bundle"]["manifest_sha256"]
        == json.loads((gallery / "_index.json").read_text())["bundle"]["manifest_sha256"]
    )
    spec = client.get("/docs.json").json()
    body = spec["paths"]["/similar"]["post"]["requestBody"]["content"]["multipart/form-data"]
    k = body["schema"]["properties"]["k"]
    assert (k["minimum"], k["maximum"], k["default"]) == (1, 100, 10)
    assert "415" in spec["paths"]["/similar"]["post"]["responses"]
    assert "/gallery/image" in spec["paths"]


@pytest.mark.parametrize(
    ("request_kwargs", "status", "words"),
    [
        ({"json": {"latents": [[0.0] * 32], "k": 0}}, 400, "k"),
        ({"json": {"latents": [[0.0] * 32], "k": 101}}, 400, "k"),
        ({"json": {"latents": [[0.0] * 32], "k": "many"}}, 400, "k"),
        ({"json": {"latents": [[0.0] * 31]}}, 400, "latent_dim is 32"),
        ({"content": b'{"latents": [[NaN' + b", 0.0" * 31 + b"]]}"}, 400, "latents"),
        ({"content": b'{"latents": [[1e400' + b", 0.0" * 31 + b"]]}"}, 400, "latents"),
        ({"json": {"latents": []}}, 400, "latents"),
        ({"json": {}}, 400, "exactly one of"),
        ({"files": files(b"not an image"), "data": {"k": "3"}}, 400, "not a readable image"),
        ({"files": files(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)}, 400, "images[0]"),
    ],
)
def test_bad_requests_are_refused_naming_the_problem(client, request_kwargs, status, words):
    if "content" in request_kwargs:
        request_kwargs = {**request_kwargs, "headers": {"content-type": "application/json"}}
    message = error_of(client.post("/similar", **request_kwargs), status)
    assert words in message, message


def test_both_images_and_latents_is_refused(client, pictures):
    data = {"latents": json.dumps([[0.0] * 32])}
    response = client.post(
        "/similar", files=files((pictures / names(pictures)[0]).read_bytes()), data=data
    )
    assert "exactly one of" in error_of(response, 400)


def test_unknown_ids_and_paths_out_of_the_root_are_refused(
    image_bundle, pictures, tmp_path, client
):
    assert "not in the gallery" in error_of(
        client.post("/gallery/image", json={"id": "../etc/passwd"}), 404
    )
    assert "id" in error_of(client.post("/gallery/image", json={"id": ""}), 400)
    # A gallery listed from paths that lead out of the folder served as its root, and a link
    # inside the root to a file outside it: neither original is served.
    root = tmp_path / "root"
    shutil.copytree(pictures, root)
    outside = tmp_path / "outside.png"
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(outside)
    os.symlink(outside, root / "link.png")
    (root / "list.txt").write_text("../outside.png\nlink.png\ngroup-0/000.png\n")
    dest = encode_to(root / "list.txt", image_bundle, tmp_path / "listed")
    build_gallery(dest, load_bundle(image_bundle))
    with serve(image_bundle, AEGAN_GALLERY=str(dest), AEGAN_GALLERY_ROOT=str(root)) as listed:
        for id in ("../outside.png", "link.png"):
            response = listed.post("/gallery/image", json={"id": id, "source": "original"})
            assert "leads outside AEGAN_GALLERY_ROOT" in error_of(response, 400)
            assert listed.post("/gallery/image", json={"id": id}).status_code == 200  # decoded
        response = listed.post(
            "/gallery/image", json={"id": "group-0/000.png", "source": "original"}
        )
        assert response.content == (root / "group-0" / "000.png").read_bytes()
        (root / "group-0" / "000.png").unlink()
        response = listed.post(
            "/gallery/image", json={"id": "group-0/000.png", "source": "original"}
        )
        assert "no file under AEGAN_GALLERY_ROOT" in error_of(response, 404)
    with serve(image_bundle, AEGAN_GALLERY=str(dest), AEGAN_GALLERY_ROOT="") as no_root:
        response = no_root.post("/gallery/image", json={"id": "link.png", "source": "original"})
        assert "AEGAN_GALLERY_ROOT is not set" in error_of(response, 404)


def test_without_a_gallery_similar_answers_404_saying_how(image_bundle, pictures):
    with serve(image_bundle, AEGAN_GALLERY="") as plain:
        message = error_of(plain.post("/similar", json={"latents": [[0.0] * 32]}), 404)
        assert "AEGAN_GALLERY" in message and "aegan index" in message
        assert error_of(plain.post("/gallery/image", json={"id": "x"}), 404)
        assert plain.post("/info").json()["gallery"] is None


def test_an_empty_gallery_answers_404(image_bundle, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a picture")
    (broken / "b.png").write_bytes(b"")
    dest = encode_to(broken, image_bundle, tmp_path / "empty")
    build_gallery(dest, load_bundle(image_bundle))
    with serve(image_bundle, AEGAN_GALLERY=str(dest), AEGAN_GALLERY_ROOT="") as empty:
        message = error_of(empty.post("/similar", json={"latents": [[0.0] * 32]}), 404)
        assert "holds no latents" in message and "2 inputs" in message
        assert empty.post("/info").json()["gallery"]["size"] == 0


def test_a_vector_model_searches_latents_but_not_images(vector_bundle, tmp_path):
    """An approximate (inverted-file) gallery of 500 vectors: the service answers what exact
    search does for most queries, and every distance it gives is exact."""
    vectors = np.random.default_rng(0).normal(size=(500, 2)).astype(np.float32)
    np.save(tmp_path / "v.npy", vectors)
    dest = encode_to(tmp_path / "v.npy", vector_bundle, tmp_path / "enc", chunk=100)
    build_gallery(dest, load_bundle(vector_bundle), kind="approximate")
    latents = np.load(next(dest.glob("_index-*.latents.npy")))
    queries = np.random.default_rng(1).normal(size=(25, 4)).round(3)  # 25 x 500: in the pool
    with serve(vector_bundle, AEGAN_GALLERY=str(dest), AEGAN_GALLERY_ROOT="") as client:
        assert client.post("/info").json()["gallery"]["kind"] == "faiss-ivf"
        body = client.post("/similar", json={"latents": queries.tolist(), "k": 5}).json()
        agree = 0
        for q, found in zip(queries, body["results"], strict=True):
            exact = np.linalg.norm(latents - q.astype(np.float32), axis=1)
            rows = [int(n["id"]) for n in found]
            np.testing.assert_allclose([n["distance"] for n in found], exact[rows], rtol=1e-5)
            agree += len(set(rows) & set(np.argsort(exact)[:5].tolist()))
        assert agree >= 0.9 * 5 * len(queries)
        upload = files(image_bytes(Image.new("L", (28, 28))))
        assert "vector model" in error_of(client.post("/similar", files=upload), 422)
        assert "vector model" in error_of(client.post("/gallery/image", json={"id": "0"}), 422)
    with serve(vector_bundle, AEGAN_GALLERY="") as plain:  # no gallery: checked first
        assert "no gallery" in error_of(plain.post("/similar", files=upload), 404)
        assert "no gallery" in error_of(plain.post("/gallery/image", json={"id": "0"}), 404)


@pytest.mark.parametrize("which", ["missing", "another bundle"])
def test_a_bad_gallery_stops_bentoml_serve_with_the_reason(
    which, image_bundle, rgb_bundle, gallery, tmp_path
):
    if which == "missing":
        target, message = tmp_path / "nowhere", "is not a directory"
    else:
        target, message = gallery, "was encoded by bundle"
    env = {
        **os.environ,
        "AEGAN_MODEL": str(rgb_bundle if which != "missing" else image_bundle),
        "AEGAN_DEVICE": "cpu",
        "AEGAN_GALLERY": str(target),
    }
    serving = bentoml_serve("aegan_serve.service:AEGAN", env=env, log=tmp_path / "serve.log")
    with pytest.raises(ServerExited) as exited, serving:
        pass
    assert exited.value.returncode != 0
    assert message in exited.value.output, exited.value.output[-2000:]
