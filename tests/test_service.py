"""Every HTTP endpoint of the service, in-process (``AEGAN.to_asgi()`` + Starlette's TestClient):
happy paths, and each kind of bad request answered with a 4xx whose message names the problem."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import numpy as np
import pytest
from PIL import Image
from service_helpers import (
    decode_png,
    error_of,
    files,
    gradient,
    image_bytes,
    png_header,
    serve,
    tiny_model_info,
)

from aegan_core.latents import sample_prior
from aegan_core.runtime import ModelRuntime
from aegan_serve.service import LIMITS

PAD = 2  # make_grid padding


def b64png(text: str) -> np.ndarray:
    return decode_png(base64.b64decode(text))


def generated_pngs(client, n: int, seed: int) -> list[bytes]:
    body = client.post("/generate", json={"n": n, "seed": seed}).json()
    return [base64.b64decode(image) for image in body["images"]]


def at_once(client, route: str, uploads, count: int) -> list:
    """``count`` identical upload requests sent together from as many threads; their answers."""
    responses = []
    threads = [
        threading.Thread(target=lambda: responses.append(client.post(route, files=uploads)))
        for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return responses


def tiles(strip: np.ndarray, count: int, size: int = 28) -> list[np.ndarray]:
    step = size + PAD
    return [strip[PAD : PAD + size, PAD + i * step : PAD + i * step + size] for i in range(count)]


# --- /sample, /generate -------------------------------------------------------------------------


def test_sample_answers_one_png_grid_with_the_seed(client):
    response = client.post("/sample", json={"n": 5, "seed": 11})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "11"
    grid = Image.open(io.BytesIO(response.content))
    assert grid.format == "PNG" and grid.mode == "L"
    assert grid.size == (3 * 30 + PAD, 2 * 30 + PAD)  # 5 images, 3 per row


def test_sample_is_deterministic_by_seed(client):
    first = client.post("/sample", json={"n": 4, "seed": 3}).content
    assert client.post("/sample", json={"n": 4, "seed": 3}).content == first
    assert client.post("/sample", json={"n": 4, "seed": 4}).content != first
    unseeded = client.post("/sample", json={"n": 4})
    seed = int(unseeded.headers["x-seed"])
    assert client.post("/sample", json={"n": 4, "seed": seed}).content == unseeded.content


def test_generate_answers_seed_latents_and_pngs(client):
    body = client.post("/generate", json={"n": 3, "seed": 5, "truncation": 0.7}).json()
    assert body["seed"] == 5 and body["vectors"] == []
    np.testing.assert_allclose(body["latents"], sample_prior(3, 32, 5, 0.7), rtol=1e-6)
    images = [b64png(image) for image in body["images"]]
    assert [image.shape for image in images] == [(28, 28)] * 3
    again = client.post("/generate", json={"n": 1, "seed": 5, "truncation": 0.7}).json()
    assert again["images"][0] == body["images"][0]  # the first k do not depend on n


def test_sample_grid_tiles_are_the_generated_images(client):
    grid = np.asarray(
        Image.open(io.BytesIO(client.post("/sample", json={"n": 2, "seed": 8}).content))
    )
    generated = [decode_png(png) for png in generated_pngs(client, 2, 8)]
    for tile, image in zip(tiles(grid, 2), generated, strict=True):
        np.testing.assert_array_equal(tile, image)


def test_truncation_zero_gives_the_mean_image_for_every_seed(client):
    body = client.post("/generate", json={"n": 4, "seed": 1, "truncation": 0.0}).json()
    assert len(set(body["images"])) == 1
    assert not np.any(body["latents"])


# --- /decode -------------------------------------------------------------------------------------


def test_decode_gives_the_generated_images(client):
    body = client.post("/generate", json={"n": 2, "seed": 9}).json()
    decoded = client.post("/decode", json={"latents": body["latents"]}).json()
    assert decoded["images"] == body["images"] and decoded["vectors"] == []


# --- /encode -------------------------------------------------------------------------------------


def test_encode_then_decode_round_trip_error_is_small(client):
    body = client.post("/generate", json={"n": 4, "seed": 21}).json()
    uploads = [base64.b64decode(image) for image in body["images"]]
    encoded = client.post("/encode", files=files(*uploads))
    assert encoded.status_code == 200, encoded.text
    latents = np.array(encoded.json()["latents"])
    assert latents.shape == (4, 32)
    assert np.abs(latents - np.array(body["latents"])).max() < 0.05  # PNG rounding only
    decoded = client.post("/decode", json={"latents": latents.tolist()}).json()
    for before, after in zip(body["images"], decoded["images"], strict=True):
        difference = np.abs(b64png(before).astype(int) - b64png(after).astype(int))
        assert difference.max() <= 2  # of 255


def test_encode_answers_in_upload_order(client):
    uploads = generated_pngs(client, 3, 30)
    together = client.post("/encode", files=files(*uploads)).json()["latents"]
    one_by_one = [client.post("/encode", files=files(u)).json()["latents"][0] for u in uploads]
    np.testing.assert_allclose(together, one_by_one, rtol=1e-5, atol=1e-6)
    reversed_order = client.post("/encode", files=files(*uploads[::-1])).json()["latents"]
    np.testing.assert_allclose(reversed_order, together[::-1], rtol=1e-5, atol=1e-6)


def test_encode_accepts_any_format_mode_and_size(client):
    picture = gradient((90, 60), "RGB")
    uploads = [
        image_bytes(picture, "PNG"),
        image_bytes(picture.convert("RGBA"), "PNG"),
        image_bytes(picture.convert("P"), "GIF"),
        image_bytes(picture, "JPEG"),
        image_bytes(picture, "WEBP"),
        image_bytes(picture.convert("L"), "BMP"),
        image_bytes(picture.convert("CMYK"), "JPEG"),
    ]
    response = client.post("/encode", files=files(*uploads))
    assert response.status_code == 200, response.text
    latents = np.array(response.json()["latents"])
    assert latents.shape == (7, 32)
    assert np.abs(latents - latents[0]).max() < 1.0  # the same picture, up to codec losses


def test_concurrent_encode_requests_are_batched_and_answered_separately(image_bundle, monkeypatch):
    slow_encode = ModelRuntime.encode

    def encode(self, data):  # a slower batch lets the other requests queue behind it
        threading.Event().wait(0.05)
        return slow_encode(self, data)

    monkeypatch.setattr(ModelRuntime, "encode", encode)
    with serve(image_bundle) as client:
        uploads = generated_pngs(client, 12, 40)
        expected = {}
        for i, upload in enumerate(uploads):
            expected[i] = client.post("/encode", files=files(upload)).json()["latents"][0]
        before = client.post("/info").json()["encode_batches"]
        responses = {}

        def request(i: int) -> None:
            responses[i] = client.post("/encode", files=files(uploads[i]))

        threads = [threading.Thread(target=request, args=(i,)) for i in range(len(uploads))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        after = client.post("/info").json()["encode_batches"]
    assert after["largest"] > 1, after  # requests were encoded together
    assert after["count"] - before["count"] < len(uploads)
    for i in range(len(uploads)):  # and each client got the latent of its own image
        assert responses[i].status_code == 200, responses[i].text
        np.testing.assert_allclose(responses[i].json()["latents"][0], expected[i], rtol=1e-5)


def test_a_full_encoder_queue_sheds_load_with_429_and_retry_after(image_bundle, monkeypatch):
    slow_encode = ModelRuntime.encode

    def encode(self, data):  # each run holds the encoder long enough for the queue to fill
        threading.Event().wait(0.2)
        return slow_encode(self, data)

    monkeypatch.setattr(ModelRuntime, "encode", encode)
    limits = {"AEGAN_MAX_IMAGES": "2", "AEGAN_MAX_QUEUE": "2", "AEGAN_BATCH_SIZE": "1"}
    with serve(image_bundle, **limits) as client:
        upload = generated_pngs(client, 1, 3)[0]
        responses = at_once(client, "/encode", files(upload), 8)
        assert client.get("/readyz").status_code == 200
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 3 and statuses.count(429) >= 1, statuses  # 1 running + 2 queued
    assert set(statuses) == {200, 429}, statuses
    shed = next(r for r in responses if r.status_code == 429)
    assert shed.headers["retry-after"] == "1"
    assert "encoder queue is full" in error_of(shed, 429)


def test_a_bad_upload_among_many_is_named_by_its_position(client):
    good = image_bytes(gradient())
    uploads = [good] * 7
    uploads[5] = b"\x89PNG\r\n\x1a\n broken"
    answer = client.post("/encode", files=files(*uploads))  # decoded in parts, in parallel
    assert error_of(answer, 400).startswith("images[5] is ")


def test_no_internal_batching_endpoint_is_public(client):
    assert client.post("/encode_batch", json={"items": [""] * 1000}).status_code == 404
    assert "/encode_batch" not in client.get("/docs.json").json()["paths"]


# --- /reconstruct --------------------------------------------------------------------------------


def test_reconstruct_answers_images_latents_and_errors(client):
    uploads = generated_pngs(client, 2, 50)
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    uploads.append(image_bytes(Image.fromarray(noise)))
    body = client.post("/reconstruct", files=files(*uploads)).json()
    assert len(body["images"]) == len(body["latents"]) == len(body["mse"]) == 3
    assert all(b64png(image).shape == (28, 28) for image in body["images"])
    mse, psnr = np.array(body["mse"]), np.array(body["psnr"])
    np.testing.assert_allclose(psnr, -10 * np.log10(mse), rtol=1e-6)
    assert mse[:2].max() < 1e-4 and psnr[:2].min() > 40  # the model's own samples
    assert mse[2] > 100 * mse[:2].max()  # noise is far from what it can make


def test_reconstruct_errors_are_on_pixels_in_0_1(tmp_path):
    """G(E(x)) = x + 0.2 on [-1, 1] is 0.1 off on [0, 1]: MSE 0.01 and PSNR 20 dB for any image
    that stays in range (on [-1, 1] it would be 0.04 and 14 dB)."""
    from bundle_factory import write_offset_bundle

    rng = np.random.default_rng(3)
    uploads = [
        image_bytes(Image.fromarray(rng.integers(0, 200, (28, 28), dtype=np.uint8)))
        for _ in range(2)
    ]
    with serve(write_offset_bundle(tmp_path / "offset", 0.2)) as offset_client:
        response = offset_client.post("/reconstruct", files=files(*uploads))
    assert response.status_code == 200, response.text
    body = response.json()
    # float32 pixels: errors of ~1e-7 on 0.1; 1e-5 relative is far below the 4x of a wrong scale
    np.testing.assert_allclose(body["mse"], [0.01, 0.01], rtol=1e-5)
    np.testing.assert_allclose(body["psnr"], [20.0, 20.0], atol=1e-4)
    for upload, image in zip(uploads, body["images"], strict=True):
        shifted = decode_png(upload).astype(float) + 25.5  # 0.2 of [-1, 1] is 25.5 grey levels
        assert np.abs(b64png(image) - shifted).max() <= 0.5 + 1e-3  # rounding to a grey level


# --- /interpolate --------------------------------------------------------------------------------


def test_interpolate_two_seeds_as_gif(client):
    response = client.post("/interpolate", json={"seeds": [1, 2], "steps": 6, "frame_ms": 50})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/gif"
    gif = Image.open(io.BytesIO(response.content))
    assert gif.n_frames == 6 and gif.size == (28, 28) and gif.info["duration"] == 50
    ends = [decode_png(generated_pngs(client, 1, seed)[0]) for seed in (1, 2)]
    gif.seek(0)
    np.testing.assert_array_equal(np.asarray(gif.convert("L")), ends[0])
    gif.seek(5)
    np.testing.assert_array_equal(np.asarray(gif.convert("L")), ends[1])


def test_interpolate_seeds_honour_truncation(client):
    """The end frames are /generate's images of the same seeds at the same truncation."""
    for truncation in (0.5, 0.0):
        response = client.post(
            "/interpolate",
            json={"seeds": [3, 4], "steps": 3, "format": "png", "truncation": truncation},
        )
        assert response.status_code == 200, response.text
        frames = tiles(decode_png(response.content), 3)
        for frame, seed in ((frames[0], 3), (frames[-1], 4)):
            body = client.post("/generate", json={"n": 1, "seed": seed, "truncation": truncation})
            np.testing.assert_array_equal(frame, b64png(body.json()["images"][0]))
    # truncation 0 pulls both seeds to the prior's mean: every frame is G(0) = tanh(0), grey 128
    assert all((frame == 128).all() for frame in frames)


def test_interpolate_two_images_ends_are_their_reconstructions(client):
    uploads = [image_bytes(gradient()), image_bytes(gradient().rotate(90))]
    reconstructions = client.post("/reconstruct", files=files(*uploads)).json()["images"]
    response = client.post(
        "/interpolate", files=files(*uploads), data={"steps": "4", "format": "png"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    strip = decode_png(response.content)
    assert strip.shape == (28 + 2 * PAD, 4 * 30 + PAD)
    frames = tiles(strip, 4)
    np.testing.assert_array_equal(frames[0], b64png(reconstructions[0]))
    np.testing.assert_array_equal(frames[-1], b64png(reconstructions[1]))


def test_interpolate_latents_lerp_and_slerp(client):
    z = sample_prior(2, 32, seed=60)
    z[1] *= 0.5  # different norms: the two paths differ
    frames = {}
    for method in ("lerp", "slerp"):
        response = client.post(
            "/interpolate",
            json={"latents": z.tolist(), "steps": 3, "method": method, "format": "png"},
        )
        assert response.status_code == 200, response.text
        frames[method] = tiles(decode_png(response.content), 3)
    middle = client.post("/decode", json={"latents": [((z[0] + z[1]) / 2).tolist()]}).json()
    np.testing.assert_array_equal(frames["lerp"][1], b64png(middle["images"][0]))
    assert not np.array_equal(frames["slerp"][1], frames["lerp"][1])
    np.testing.assert_array_equal(frames["slerp"][0], frames["lerp"][0])


# --- /info, health, OpenAPI ----------------------------------------------------------------------


def test_info_describes_model_runtime_and_limits(client, image_bundle):
    info = client.post("/info").json()
    assert info["model"] == tiny_model_info(image_bundle)
    assert info["runtime"]["provider"] == "CPUExecutionProvider"
    assert info["runtime"]["precision"] == "fp32"
    assert info["runtime"]["cuda_unused_reason"] == "AEGAN_DEVICE=cpu"  # the test servers' setting
    assert info["runtime"]["cuda_fallbacks"] == 0
    assert info["limits"]["AEGAN_MAX_N"] == LIMITS.max_n
    assert info["limits"]["AEGAN_MAX_UPLOAD_BYTES"] == LIMITS.max_upload_bytes
    assert set(info["encode_batches"]) == {"count", "largest", "sizes"}


def test_health_endpoints_and_openapi_bounds(client):
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    spec = client.get("/docs.json").json()
    assert set(spec["paths"]) >= {
        "/sample",
        "/generate",
        "/encode",
        "/decode",
        "/reconstruct",
        "/interpolate",
        "/info",
    }
    n = spec["paths"]["/sample"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert n["properties"]["n"]["maximum"] == LIMITS.max_n
    assert n["properties"]["n"]["minimum"] == 1


# --- other bundles -------------------------------------------------------------------------------


def test_colour_bundle_of_another_size(rgb_bundle):
    with serve(rgb_bundle) as client:
        grid = Image.open(io.BytesIO(client.post("/sample", json={"n": 2, "seed": 1}).content))
        assert grid.mode == "RGB" and grid.size == (2 * (24 + PAD) + PAD, 16 + 2 * PAD)
        images = client.post("/generate", json={"n": 1, "seed": 1}).json()["images"]
        assert b64png(images[0]).shape == (16, 24, 3)
        uploads = [image_bytes(gradient((50, 50), "RGBA")), image_bytes(gradient((20, 40)))]
        latents = client.post("/encode", files=files(*uploads)).json()["latents"]
        assert np.array(latents).shape == (2, 8)
        gif = client.post("/interpolate", json={"seeds": [1, 2], "steps": 3})
        assert Image.open(io.BytesIO(gif.content)).size == (24, 16)


def test_vector_bundle_answers_vectors_and_refuses_image_endpoints(vector_bundle):
    with serve(vector_bundle) as client:
        body = client.post("/generate", json={"n": 3, "seed": 2}).json()
        assert body["images"] == [] and np.array(body["vectors"]).shape == (3, 2)
        decoded = client.post("/decode", json={"latents": body["latents"]}).json()
        np.testing.assert_allclose(decoded["vectors"], body["vectors"], rtol=1e-6)
        assert client.post("/info").json()["model"]["kind"] == "vector"
        png = image_bytes(gradient())
        requests = {
            "/sample": {"json": {"n": 1}},
            "/encode": {"files": files(png)},
            "/reconstruct": {"files": files(png)},
            "/interpolate": {"json": {"seeds": [1, 2]}},
        }
        for route, kwargs in requests.items():
            message = error_of(client.post(route, **kwargs), 422)
            assert "is a vector model" in message and route in message


# --- bad requests: each is a 4xx that names the problem ------------------------------------------


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/sample", {"n": 0}, "n: Input should be greater than or equal to 1"),
        (
            "/sample",
            {"n": LIMITS.max_n + 1},
            f"n: Input should be less than or equal to {LIMITS.max_n}",
        ),
        ("/generate", {"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ("/generate", {"seed": 2**32}, "seed: Input should be less than or equal to 4294967295"),
        ("/generate", {"truncation": 1.5}, "truncation: Input should be less than or equal to 1"),
        ("/generate", {"n": "many"}, "n: Input should be a valid integer"),
        ("/interpolate", {"seeds": [1, 2], "steps": 1}, "steps: Input should be greater than"),
        (
            "/interpolate",
            {"seeds": [1, 2], "steps": LIMITS.max_steps + 1},
            f"steps: Input should be less than or equal to {LIMITS.max_steps}",
        ),
        ("/interpolate", {"seeds": [1, 2], "method": "cubic"}, "method: Input should be 'slerp'"),
        ("/interpolate", {"seeds": [1, 2], "format": "mp4"}, "format: Input should be 'gif'"),
        ("/interpolate", {"seeds": [1, 2, 3]}, "seeds: List should have at most 2 items"),
        ("/decode", {"latents": []}, "latents: List should have at least 1 item"),
        (
            "/decode",
            {"latents": [[0.0] * 32] * (LIMITS.max_n + 1)},
            f"latents: List should have at most {LIMITS.max_n} items",
        ),
        ("/decode", {"latents": [[1e6] + [0.0] * 31]}, "latents.0.0: Input should be less than or"),
        ("/decode", {}, "latents: Field required"),
    ],
)
def test_out_of_bounds_fields_are_400(client, route, body, field):
    assert field in error_of(client.post(route, json=body), 400)


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_latents_are_400(client, value):
    body = b'{"latents": [[' + value + b"" + b", 0.0" * 31 + b"]]}"
    response = client.post("/decode", content=body, headers={"content-type": "application/json"})
    assert "latents.0.0: Input should be a finite number" in error_of(response, 400)


def test_wrong_latent_length_is_400(client):
    response = client.post("/decode", json={"latents": [[0.0] * 32, [0.0] * 31]})
    assert "latents[1] has 31 values; this model's latent_dim is 32" in error_of(response, 400)
    response = client.post("/interpolate", json={"latents": [[0.0] * 3, [0.0] * 3]})
    assert "latents[0] has 3 values" in error_of(response, 400)


def test_interpolate_needs_exactly_one_pair_of_end_points(client):
    assert "got none" in error_of(client.post("/interpolate", json={}), 400)
    both = {"seeds": [1, 2], "latents": [[0.0] * 32] * 2}
    assert "got seeds, latents" in error_of(client.post("/interpolate", json=both), 400)
    one = client.post("/interpolate", files=files(image_bytes(gradient())))
    assert "images needs 2 uploads" in error_of(one, 400)


def test_too_many_images_is_400(client):
    png = image_bytes(Image.new("L", (2, 2)))
    message = error_of(client.post("/encode", files=files(*[png] * (LIMITS.max_images + 1))), 400)
    assert f"images: List should have at most {LIMITS.max_images} items" in message


def test_missing_images_is_400(client):
    assert "images: Field required" in error_of(client.post("/encode", json={}), 400)


def test_oversized_upload_is_413(client):
    blob = png_header(28, 28) + b"\0" * LIMITS.max_upload_bytes
    message = error_of(client.post("/reconstruct", files=files(image_bytes(gradient()), blob)), 413)
    assert "images[1] is" in message and "AEGAN_MAX_UPLOAD_BYTES" in message


@pytest.mark.parametrize("side", [5000, 20000])
def test_decompression_bombs_are_413(client, side):
    message = error_of(client.post("/encode", files=files(png_header(side, side))), 413)
    assert "images[0]" in message and "AEGAN_MAX_PIXELS" in message


@pytest.mark.parametrize(
    ("blob", "status", "message"),
    [
        (b"definitely not an image", 400, "images[0] is not a readable image"),
        (image_bytes(gradient())[:60], 400, "images[0] is a corrupt or truncated PNG image"),
        (image_bytes(gradient(), "TIFF"), 415, "images[0] is a TIFF file; accepted image formats"),
        (b"", 400, "images[0] is empty"),
    ],
)
def test_bad_uploads_are_4xx(client, blob, status, message):
    for route in ("/encode", "/reconstruct"):
        assert message in error_of(client.post(route, files=files(blob)), status)


def test_malformed_form_bodies_are_4xx(client):
    png = image_bytes(gradient())
    text_as_file = client.post("/encode", files={"images": (None, "https://example.invalid/x.png")})
    assert "form field 'images' must be an uploaded file" in error_of(text_as_file, 400)
    file_as_text = client.post("/interpolate", files=[*files(png, png), ("steps", ("s", b"3"))])
    assert "form field 'steps' takes a value, not a file" in error_of(file_as_text, 400)
    file_to_json_endpoint = client.post("/decode", files=files(png))
    assert "form field 'images' takes a value, not a file" in error_of(file_to_json_endpoint, 400)
    urlencoded = client.post("/encode", data={"images": "abc"})
    assert "send it as multipart/form-data" in error_of(urlencoded, 400)
    headers = {"content-type": "multipart/form-data"}
    assert error_of(client.post("/encode", content=b"x", headers=headers), 400) == (
        "multipart/form-data without a boundary"
    )
    headers = {"content-type": "multipart/form-data; boundary=abc"}
    garbled = client.post("/encode", content=b"garbage", headers=headers)
    assert "malformed multipart/form-data body" in error_of(garbled, 400)
    not_json = client.post(
        "/decode", content=b"{latents", headers={"content-type": "application/json"}
    )
    assert "Invalid JSON" in error_of(not_json, 400)


@pytest.fixture()
def url_target():
    """A local HTTP server that records every request it gets: the service must never call it."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(image_bytes(gradient()))

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/picture.png", hits
    server.shutdown()


def test_the_service_never_fetches_a_url_named_by_a_client(client, url_target):
    url, hits = url_target
    form = {"content-type": "application/x-www-form-urlencoded"}
    for name in ("images", "imag%65s", "%69mages", "images%00"):
        answer = client.post("/encode", content=f"{name}={url}", headers=form)
        assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text)
    multipart = f'--b\r\nContent-Disposition: form-data; name="images"\r\n\r\n{url}\r\n--b--\r\n'
    for headers in (
        [("content-type", "multipart/form-data; boundary=b")],
        [("content-type", "application/json"), ("content-type", "multipart/form-data; boundary=b")],
        [("content-type", "multipart/form-data; boundary=b"), ("content-type", "application/json")],
    ):
        answer = client.post("/encode", content=multipart.encode(), headers=headers)
        assert 400 <= answer.status_code < 500, (headers, answer.status_code, answer.text)
    as_json = client.post("/reconstruct", json={"images": [url]})
    assert as_json.status_code == 400, as_json.text
    assert hits == []


def test_two_content_type_headers_are_400(client):
    headers = [("content-type", "application/json"), ("content-type", "text/plain")]
    answer = client.post("/decode", content=b'{"latents": [[0]]}', headers=headers)
    assert "more than one content-type header" in error_of(answer, 400)


def test_request_body_over_the_limit_is_413(client):
    headers = {
        "content-type": "multipart/form-data; boundary=b",
        "content-length": str(LIMITS.max_request_bytes + 1),
    }
    response = client.post("/encode", content=b"--b--\r\n", headers=headers)
    message = (
        f"request body is larger than {LIMITS.max_request_bytes} bytes (AEGAN_MAX_REQUEST_BYTES)"
    )
    assert error_of(response, 413) == message
    # answered by the guard itself, before the app: a complete JSON response
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-length"] == str(len(response.content))


def test_work_that_waited_too_long_for_a_thread_is_refused_not_run(image_bundle, monkeypatch):
    """More heavy requests than the CPUs can serve in time are shed with 429 (before decoding)
    instead of piling up until the request timeout answers 504."""
    from aegan_core import images as image_module

    decoded = []
    slow_load = image_module.load_uploads

    def load_uploads(*args, **kwargs):
        threading.Event().wait(0.3)  # a heavy decode holds the (single) worker thread
        decoded.append(1)
        return slow_load(*args, **kwargs)

    monkeypatch.setattr("aegan_serve.app.load_uploads", load_uploads)
    limits = {"AEGAN_BATCH_LATENCY_MS": "100", "AEGAN_WORKERS": "2"}  # one pool thread
    with serve(image_bundle, **limits) as client:
        upload = image_bytes(gradient())
        responses = at_once(client, "/reconstruct", files(upload), 6)
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429} and statuses.count(200) < 6, statuses
    assert len(decoded) == statuses.count(200)  # the refused ones cost no decoding
    shed = next(r for r in responses if r.status_code == 429)
    assert "for a worker thread" in error_of(shed, 429) and shed.headers["retry-after"] == "1"


def test_url_encoded_file_fields_are_refused_wherever_they_are(client):
    refused = "form field 'images' is a file: send it as multipart/form-data"
    form = {"content-type": "application/x-www-form-urlencoded"}
    after_another = client.post("/encode", content=b"steps=3&images=abc", headers=form)
    assert error_of(after_another, 400) == refused
    not_utf8 = client.post("/encode", content=b"\xff\xfe=1&images=abc", headers=form)
    assert error_of(not_utf8, 400) == refused
    # percent-encoded bytes that are not UTF-8, in a name or in a value: decoded with
    # replacement characters, as the form parser does, not a server error
    for body in (b"%FF%FE=1&images=abc", b"steps=%FF&images=abc"):
        assert error_of(client.post("/encode", content=body, headers=form), 400) == refused


def test_url_encoded_field_size_limit(client):
    """Starlette's limit on a url-encoded field, 1 MiB, counts the name and the value as sent
    (percent-encoded); the guard answers 413 past it (Starlette's own refusal would reach BentoML
    as a server error)."""
    form = {"content-type": "application/x-www-form-urlencoded"}
    too_large = "a form field is larger than 1048576 bytes"
    # "steps" (5 bytes) and a value: exactly 1 MiB reaches the endpoint (not a number: 400)
    at_limit = b"steps=" + b"x" * ((1 << 20) - 5) + b"&seeds=[1,2]"
    answer = client.post("/interpolate", content=at_limit, headers=form)
    assert error_of(answer, 400) == "steps: Input should be a valid integer"
    over = b"steps=" + b"x" * ((1 << 20) - 4) + b"&seeds=[1,2]"
    assert error_of(client.post("/interpolate", content=over, headers=form), 413) == too_large
    encoded = b"steps=" + b"%31" * 349_526 + b"&seeds=[1,2]"  # 349 526 digits, 1 MiB + 3 sent
    assert error_of(client.post("/interpolate", content=encoded, headers=form), 413) == too_large
    name_only = b"x" * ((1 << 20) + 1) + b"&steps=3&seeds=[1,2]"
    assert error_of(client.post("/interpolate", content=name_only, headers=form), 413) == too_large


def _streamed(total: int, chunk: bytes):
    """A body of ``total`` bytes sent in chunks without a Content-Length (chunked encoding)."""
    for _ in range(total // len(chunk)):
        yield chunk


@pytest.mark.parametrize("route", ["/decode", "/encode"])
def test_chunked_body_over_the_limit_is_413(client, route):
    """No Content-Length to refuse early: the guard counts the bytes as they arrive. Without it
    the 66 MiB body is read and parsed, and answered 400 (not JSON; not images)."""
    chunk = b" " * (1 << 20)
    total = LIMITS.max_request_bytes + 2 * len(chunk)
    if route == "/decode":
        headers = {"content-type": "application/json"}
        body = _streamed(total, chunk)
    else:  # parts of 1 MiB each, all files, none of them an image
        boundary = b"b0undary"
        head = b"--" + boundary + b'\r\nContent-Disposition: form-data; name="images"; '
        head += b'filename="x.bin"\r\n\r\n'
        part = head + b"x" * (len(chunk) - len(head) - 2) + b"\r\n"
        headers = {"content-type": f"multipart/form-data; boundary={boundary.decode()}"}
        body = _streamed(total, part)
    response = client.post(route, content=body, headers=headers)
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert "request body is larger than" in error_of(response, 413)


def test_chunked_body_of_exactly_the_limit_is_read(client):
    """The limit is inclusive: a JSON body of exactly AEGAN_MAX_JSON_BYTES reaches the endpoint
    (spaces are not JSON: 400, not 413)."""
    chunk = b" " * (1 << 16)
    body = _streamed(LIMITS.max_json_bytes, chunk)
    response = client.post("/decode", content=body, headers={"content-type": "application/json"})
    assert "Invalid JSON" in error_of(response, 400)


def _multipart(*parts: tuple[bytes, bytes | None, bytes]) -> tuple[bytes, dict[str, str]]:
    """A multipart body from (name, filename or None, data) parts, names as raw bytes."""
    body = b""
    for name, filename, data in parts:
        disposition = b'form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        body += b"--b0undary\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + data + b"\r\n"
    return body + b"--b0undary--\r\n", {"content-type": "multipart/form-data; boundary=b0undary"}


def test_multipart_part_count_and_text_part_size_limits(client):
    png = image_bytes(gradient())
    body, headers = _multipart(*[(b"images", b"x.png", png)] * 1001)
    message = "multipart body has more than 1000 parts"
    assert error_of(client.post("/encode", content=body, headers=headers), 400) == message
    # a text part of exactly 1 MiB passes the guard (its value is then not a number: 400);
    # one byte more is refused by the guard (413)
    for size, status in ((1 << 20, 400), ((1 << 20) + 1, 413)):
        body, headers = _multipart((b"steps", None, b"x" * size), (b"seeds", None, b"[1, 2]"))
        response = client.post("/interpolate", content=body, headers=headers)
        assert response.status_code == status, (size, response.text)
    assert "a form field is larger than 1048576 bytes" in error_of(response, 413)


def test_a_part_name_that_is_not_utf8_is_no_server_error(client):
    body, headers = _multipart(
        (b"images", b"x.png", image_bytes(gradient())), (b"\xff", None, b"1")
    )
    response = client.post("/encode", content=body, headers=headers)
    assert response.status_code == 200, response.text  # the unknown field is ignored


def test_a_json_number_too_long_to_parse_is_400(client):
    body = b'{"n": ' + b"1" * 5000 + b"}"  # over Python's 4300-digit limit for int()
    response = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert error_of(response, 400).startswith("body: Invalid JSON: number out of range")


def test_a_form_number_too_long_to_parse_is_400(client):
    fields = [("steps", (None, "1" * 5000)), ("seeds", (None, "[1, 2]"))]
    message = error_of(client.post("/interpolate", files=fields), 400)
    # the reason is Python's own: its limit on the digits of an int
    assert message.startswith("form field 'steps' has a value that cannot be read: Exceeds the ")
    assert "4300" in message and "nested" not in message
    nested = [("latents", (None, "[" * 100_000)), ("seeds", (None, "[1, 2]"))]
    message = error_of(client.post("/interpolate", files=nested), 400)
    assert message == "form field 'latents' has a value that cannot be read: nested too deeply"
