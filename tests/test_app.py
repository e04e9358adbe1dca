"""The application behind the endpoints (aegan_serve/app.py), called directly: no server, no HTTP.
And the endpoints' declarations (@endpoint): route, scope and image use, each in one place."""

from __future__ import annotations

import asyncio
import io
import logging
import math
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import write_bundle
from PIL import Image
from service_helpers import tiny_model_info

import aegan_serve.app
from aegan_core.errors import ClientError, Overloaded, RequestError, WrongModelKind
from aegan_core.gallery import GalleryError, GalleryNotFound
from aegan_core.latents import sample_prior
from aegan_serve.app import Application
from aegan_serve.config import Settings


def application(bundle: Path, **env: str) -> Application:
    environ = {"AEGAN_MODEL": str(bundle), "AEGAN_DEVICE": "cpu", "AEGAN_WORKERS": "1"}
    return Application(Settings.from_env(environ | env))


def png(seed: int, size: tuple[int, int] = (28, 28), mode: str = "L") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def image_app(image_bundle: Path) -> Application:
    """Three worker threads on any machine, so that the uploads of a request are split in parts."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("aegan_serve.app.available_cpus", lambda: 3)
        return application(image_bundle)


def test_draws_are_repeatable_and_make_images(image_app):
    seed, z = image_app.draw(4, 7, 1.0)
    assert seed == 7 and z.shape == (4, 32)
    assert np.array_equal(image_app.draw(4, 7, 1.0)[1], z)
    assert not np.array_equal(image_app.draw(4, 8, 1.0)[1], z)
    assert image_app.draw(2, None, 1.0)[0] >= 0  # a random seed, reported
    grid = Image.open(io.BytesIO(asyncio.run(image_app.grid_png(z))))
    assert grid.format == "PNG" and grid.size[0] >= 2 * 28
    decoded = asyncio.run(image_app.decode(z))
    assert list(decoded) == ["images"] and len(decoded["images"]) == 4


def test_encode_and_reconstruct_keep_the_uploads_order(image_app):
    uploads = [png(i) for i in range(5)]  # decoded in parts of 2, 2 and 1
    z = asyncio.run(image_app.encode(uploads))
    assert z.shape == (5, 32)
    alone = [asyncio.run(image_app.encode([u]))[0] for u in uploads]
    np.testing.assert_allclose(z, np.stack(alone), atol=1e-5)
    np.testing.assert_allclose(asyncio.run(image_app.encode(uploads[:4])), z[:4], atol=1e-5)  # 2+2
    answer = asyncio.run(image_app.reconstruct(uploads))
    assert {k: len(v) for k, v in answer.items()} == {
        "latents": 5,
        "images": 5,
        "mse": 5,
        "psnr": 5,
    }
    np.testing.assert_allclose(answer["latents"], z, atol=1e-5)
    assert all(m >= 0 for m in answer["mse"])


def test_a_broken_upload_is_a_client_error_naming_it(image_app):
    with pytest.raises(ClientError, match=r"images\[1\] is not a readable image"):
        asyncio.run(image_app.encode([png(0), b"not an image"]))


def test_animation_frames_and_formats(image_app):
    ends = image_app.latents([[0.0] * 32, [1.0] * 32])
    gif = asyncio.run(image_app.animation(ends, 5, "slerp", "gif", 100))
    assert Image.open(io.BytesIO(gif)).n_frames == 5
    strip = Image.open(io.BytesIO(asyncio.run(image_app.animation(ends, 5, "lerp", "png", 100))))
    assert strip.format == "PNG" and strip.size[0] >= 5 * 28


def test_latents_are_checked_against_the_model(image_app):
    with pytest.raises(RequestError) as refused:
        image_app.latents([[0.0] * 32, [0.0] * 31])
    assert str(refused.value) == "latents[1] has 31 values; this model's latent_dim is 32"


def test_no_gallery_is_a_404_saying_how_to_get_one(image_app):
    with pytest.raises(GalleryNotFound) as refused:
        asyncio.run(image_app.similar(np.zeros((1, 32), np.float32), 3))
    assert str(refused.value) == (
        "this server has no gallery: index an `aegan encode` output with `aegan index DEST` and "
        "start the server with AEGAN_GALLERY=DEST"
    )
    with pytest.raises(GalleryNotFound):
        image_app.gallery_png("x")


LONG = "d" * 150 + "/" + "e" * 150  # a folder and a file name: an id of 306 characters


@pytest.fixture(scope="module")
def originals(image_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A gallery listed from ``root/list.txt``, and its root: pictures under suffixes the service
    knows and one it does not, and files with long names that the tests then move or replace."""
    pytest.importorskip("pyarrow.parquet", reason="the 'batch' extra (pyarrow) is not installed")
    from test_gallery import encode_to

    from aegan_batch.index import build_gallery
    from aegan_core.bundle import load_bundle

    root = tmp_path_factory.mktemp("originals")
    (root / LONG).parent.mkdir()
    names = ["a.png", "b.JPG", "c.pic", f"{LONG}.png", f"{LONG}.away.png", f"{LONG}.loop.png"]
    names += ["f.png", "g.png"]  # 8 in all
    for i, name in enumerate(names):
        formats = {".JPG": "JPEG"}
        Image.open(io.BytesIO(png(i))).save(
            root / name, format=formats.get(Path(name).suffix, "PNG")
        )
    (root / "list.txt").write_text("\n".join(names) + "\n")
    dest = encode_to(root / "list.txt", image_bundle, tmp_path_factory.mktemp("originals-gallery"))
    build_gallery(dest, load_bundle(image_bundle))
    return dest, root


def test_gallery_originals_are_the_files_with_their_media_type(image_bundle, originals):
    dest, root = originals
    app = application(image_bundle, AEGAN_GALLERY=str(dest), AEGAN_GALLERY_ROOT=str(root))
    for id, media_type in [
        ("a.png", "image/png"),
        ("b.JPG", "image/jpeg"),
        ("c.pic", "application/octet-stream"),  # a suffix of no known format: bytes, untyped
    ]:
        assert asyncio.run(app.gallery_original(id)) == ((root / id).read_bytes(), media_type)
    no_root = application(image_bundle, AEGAN_GALLERY=str(dest), AEGAN_GALLERY_ROOT="")
    assert app.info()["gallery"]["originals"] is True
    assert no_root.info()["gallery"]["originals"] is False
    with pytest.raises(GalleryNotFound) as refused:
        asyncio.run(no_root.gallery_original("a.png"))
    assert str(refused.value) == (
        "the originals are not served (AEGAN_GALLERY_ROOT is not set); ask for source=decoded"
    )


def test_a_gallery_of_another_bundle_is_refused_by_the_application_itself(rgb_bundle, originals):
    """The service checks the gallery once before its workers start; each worker's application
    still refuses a gallery whose latents another bundle made."""
    dest, _ = originals
    with pytest.raises(GalleryError, match="was encoded by bundle") as refused:
        application(rgb_bundle, AEGAN_GALLERY=str(dest))
    assert f"gallery {dest} was encoded by bundle" in str(refused.value)


def test_a_search_of_more_than_10000_rows_waits_for_the_busy_pool_and_a_smaller_one_does_not(
    image_bundle, originals, monkeypatch
):
    """Queries x gallery latents: up to 10 000 are searched on the event loop, more in the worker
    pool, where work that waited longer than AEGAN_BATCH_LATENCY_MS is refused."""
    dest, _ = originals
    monkeypatch.setattr("aegan_serve.app.available_cpus", lambda: 1)
    app = application(image_bundle, AEGAN_GALLERY=str(dest), AEGAN_BATCH_LATENCY_MS="100")
    assert app.require_gallery().size == 8
    real_load = aegan_serve.app.load_uploads
    decoding = threading.Event()

    def slow_load(*args, **kwargs):
        decoding.set()
        time.sleep(0.5)
        return real_load(*args, **kwargs)

    monkeypatch.setattr("aegan_serve.app.load_uploads", slow_load)
    z = np.zeros((1251, 32), np.float32)

    async def while_decoding():
        first = asyncio.ensure_future(app.encode([png(0)]))
        for _ in range(500):  # until the worker thread is taken (a few ms)
            if decoding.is_set() or first.done():
                break
            await asyncio.sleep(0.01)
        rest = await asyncio.gather(
            app.similar(z[:1250], 1), app.similar(z, 1), return_exceptions=True
        )
        return [await first, *rest]

    _, inline, pooled = asyncio.run(while_decoding())
    assert len(inline) == 1250 and len(inline[0]) == 1  # 1250 x 8 = 10 000
    assert isinstance(pooled, Overloaded), pooled  # 1251 x 8
    answered = asyncio.run(app.similar(z, 2))  # the pool free again
    assert len(answered) == 1251 and answered[1250] == asyncio.run(app.similar(z[:1], 2))[0]


def test_a_gallery_original_gone_away_or_looping_is_refused_quoting_200_characters(
    image_bundle, originals, tmp_path
):
    dest, root = originals
    app = application(image_bundle, AEGAN_GALLERY=str(dest), AEGAN_GALLERY_ROOT=str(root))
    assert asyncio.run(app.gallery_original(f"{LONG}.png"))[1] == "image/png"
    outside = tmp_path / "outside.png"
    (root / f"{LONG}.away.png").rename(outside)
    (root / f"{LONG}.away.png").symlink_to(outside)
    loop = root / f"{LONG}.loop.png"
    loop.unlink()
    loop.symlink_to(loop)
    (root / f"{LONG}.png").unlink()
    for id, error, words in [
        (
            f"{LONG}.away.png",
            RequestError,
            "leads outside AEGAN_GALLERY_ROOT; its original is not served",
        ),
        (f"{LONG}.png", GalleryNotFound, "has no file under AEGAN_GALLERY_ROOT"),
        (f"{LONG}.loop.png", GalleryNotFound, "has no file under AEGAN_GALLERY_ROOT"),
    ]:
        with pytest.raises(error) as refused:
            asyncio.run(app.gallery_original(id))
        assert type(refused.value) is error
        assert str(refused.value) == f"id {id[:200]!r} {words}"


def test_info_reports_the_model_runtime_limits_and_encoder_batches(image_bundle):
    app = application(
        image_bundle,
        AEGAN_THREADS="2",
        AEGAN_WORKERS="3",
        AEGAN_BATCH_SIZE="8",
        AEGAN_BATCH_LATENCY_MS="250",
        AEGAN_MAX_QUEUE="100",
        AEGAN_MAX_N="5",
    )
    assert app.info()["encode_batches"] == {"count": 0, "largest": 0, "sizes": {}}
    encoder_threads, encode = [], app.model.encode
    app.model.encode = lambda x: (
        encoder_threads.append(threading.current_thread().name) or encode(x)
    )
    asyncio.run(app.encode([png(i) for i in range(3)]))
    assert encoder_threads[0].startswith("aegan-encoder")  # the encoder's own thread
    app.encoder.inline_budget_s = math.inf  # rows count as cheap on any machine
    asyncio.run(app.encode([png(9)]))
    # one image and the encoder idle: run on the event loop, no thread hops
    assert encoder_threads[1] == threading.current_thread().name
    info = app.info()
    assert info["model"] == tiny_model_info(image_bundle)
    assert info["runtime"] == {
        "provider": "CPUExecutionProvider",
        "precision": "fp32",
        "threads": 2,  # AEGAN_THREADS reaches the runtime
        "workers": 3,
        "cuda_unused_reason": "AEGAN_DEVICE=cpu",
        "cuda_fallbacks": 0,
        "fp16_max_abs_error": {},
    }
    limits = app.settings.limits
    assert info["limits"] == {
        "AEGAN_MAX_IMAGES": limits.max_images,
        "AEGAN_MAX_UPLOAD_BYTES": limits.max_upload_bytes,
        "AEGAN_MAX_PIXELS": limits.max_pixels,
        "AEGAN_MAX_N": 5,
        "AEGAN_MAX_STEPS": limits.max_steps,
        "AEGAN_MAX_REQUEST_BYTES": limits.max_request_bytes,
        "AEGAN_MAX_JSON_BYTES": limits.max_json_bytes,
        "AEGAN_MAX_INFLIGHT_BYTES": limits.max_inflight_bytes,
        "AEGAN_BATCH_SIZE": 8,
        "AEGAN_BATCH_LATENCY_MS": 250,
        "AEGAN_MAX_QUEUE": 100,
    }
    # Runs of 3 images, then of 1: counted per size, the sizes in increasing order.
    batches = info["encode_batches"]
    assert (batches["count"], batches["largest"]) == (2, 3)
    assert list(batches["sizes"].items()) == [("1", 1), ("3", 1)]
    assert info["gallery"] is None and info["version"] == aegan_serve.__version__


def test_the_start_up_line_names_the_model_the_runtime_and_why_cuda_is_not_used(
    image_bundle, caplog
):
    with caplog.at_level(logging.INFO, logger="bentoml.aegan_serve"):
        application(image_bundle, AEGAN_THREADS="1")
    lines = [r.getMessage() for r in caplog.records if r.name == "bentoml.aegan_serve"]
    assert lines == [
        f"model 'tiny-test' from {image_bundle}: image (1, 28, 28), latent_dim 32; ONNX Runtime "
        "CPUExecutionProvider (fp32, 1 threads); CUDA not used: AEGAN_DEVICE=cpu"
    ]


def test_the_metrics_count_images_per_encoder_run(image_bundle):
    from prometheus_client import REGISTRY, generate_latest

    # An application of its own: the metrics are made (once per process) by the first one
    image_app = application(image_bundle)

    def count(le: str) -> float:
        return REGISTRY.get_sample_value("aegan_encoder_batch_images_bucket", {"le": le}) or 0.0

    before = {le: count(le) for le in ("2.0", "4.0")}
    asyncio.run(image_app.encode([png(i) for i in range(3)]))  # one run of 3 images
    assert count("2.0") == before["2.0"] and count("4.0") == before["4.0"] + 1
    text = generate_latest(REGISTRY).decode()
    assert (
        "# HELP aegan_encoder_batch_images Images per encoder run (concurrent requests batched "
        "together)\n" in text
    )
    buckets = re.findall(r'^aegan_encoder_batch_images_bucket\{le="([^"]+)"\}', text, re.M)
    assert buckets == [f"{b}.0" for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)] + ["+Inf"]
    # The count of CUDA fallbacks is there from the start (tests/test_cuda.py counts one).
    assert (
        "# HELP aegan_cuda_fallbacks_total Times a worker left CUDA for the CPU provider\n" in text
    )
    assert REGISTRY.get_sample_value("aegan_cuda_fallbacks_total") is not None


def test_work_that_waited_for_the_busy_pool_is_refused_and_one_image_is_not(
    image_bundle, monkeypatch
):
    """One worker thread, held by a slow decode: a one-image request still runs (on the event
    loop), larger ones waited longer than AEGAN_BATCH_LATENCY_MS and are refused, not run."""
    monkeypatch.setattr("aegan_serve.app.available_cpus", lambda: 3)
    app = application(image_bundle, AEGAN_BATCH_LATENCY_MS="100", AEGAN_WORKERS="2")  # 3 // 2
    decoding_threads = []
    real_load = aegan_serve.app.load_uploads

    def slow_load(*args, **kwargs):
        decoding_threads.append(threading.current_thread().name)
        time.sleep(0.5)
        return real_load(*args, **kwargs)

    monkeypatch.setattr("aegan_serve.app.load_uploads", slow_load)
    _, z = app.draw(2, 0, 1.0)

    async def while_decoding():
        first = asyncio.ensure_future(app.encode([png(0)]))
        for _ in range(500):  # until the worker thread is taken (a few ms)
            if decoding_threads or first.done():
                break
            await asyncio.sleep(0.01)
        rest = await asyncio.gather(
            app.decode(z[:1]), app.decode(z), app.encode([png(1)]), return_exceptions=True
        )
        return [await first, *rest]

    encoded, one, two, late = asyncio.run(while_decoding())
    assert encoded.shape == (1, 32) and len(one["images"]) == 1
    for refused in (two, late):
        assert isinstance(refused, Overloaded), refused
        assert re.fullmatch(
            r"waited \d+\.\d s for a worker thread, longer than 0\.1 s; retry shortly", str(refused)
        )
    assert len(decoding_threads) == 1 and decoding_threads[0].startswith("aegan-work")


def test_a_vector_model_decodes_vectors_and_refuses_image_work(vector_bundle):
    app = application(vector_bundle)
    _, z = app.draw(3, 1, 1.0)
    assert len(asyncio.run(app.decode(z))["vectors"]) == 3
    with pytest.raises(WrongModelKind) as refused:
        app.require_images("/sample")
    assert str(refused.value) == (
        "model 'tiny-test' is a vector model (data shape [2]), and /sample works with images "
        "only; /generate and /decode return its vectors"
    )
    with pytest.raises(WrongModelKind) as refused:
        asyncio.run(app.encode([png(0)]))
    assert "and decoding uploads works with images only" in str(refused.value)


# --- the declarations ----------------------------------------------------------------------------


def test_each_endpoint_declares_its_scope_and_image_use_once():
    from aegan_serve.service import DECLARED, SERVICE

    routes = {d.route: d for d in DECLARED}
    assert set(routes) == {api.route for api in SERVICE.apis.values()}
    assert {r for r, d in routes.items() if d.images == "always"} == {
        "/sample",
        "/encode",
        "/reconstruct",
        "/interpolate",
        "/gallery/image",
    }
    assert routes["/similar"].images == "when uploaded"
    assert {r for r, d in routes.items() if d.gallery} == {"/similar", "/gallery/image"}
    assert routes["/info"].scope is None and routes["/similar"].scope == "search"
    assert all(d.scope in (None, "generate", "encode", "search") for d in DECLARED)


def test_an_upload_field_holds_the_bytes_of_a_file_part_bytes_or_a_local_file(tmp_path):
    from starlette.datastructures import UploadFile

    from aegan_serve.service import InMemoryFile

    field = InMemoryFile()
    (tmp_path / "b.png").write_bytes(b"from disk")
    part = UploadFile(io.BytesIO(b"from a part"), filename="pictures/a.png")
    uploads = [field.decode(value) for value in (part, b"bytes", tmp_path / "b.png")]
    assert [u.data for u in uploads] == [b"from a part", b"bytes", b"from disk"]
    with pytest.raises(ValueError) as refused:
        field.decode("a text field")
    assert str(refused.value) == "expected an uploaded file"


@pytest.mark.parametrize("prior", ["normal", "uniform(-1, 1)"])
def test_draws_come_from_the_prior_the_bundle_names(tmp_path, prior):
    app = application(write_bundle(tmp_path / "bundle", prior=prior))
    seed, z = app.draw(200, 7, 0.5)
    family = prior.split("(")[0]
    assert seed == 7 and app.info()["model"]["latent_prior"] == family
    np.testing.assert_array_equal(z, sample_prior(200, 32, 7, 0.5, family))
    assert bool(np.abs(z).max() <= 0.5) is (family == "uniform")  # psi * U(-1, 1) stays within 0.5
