"""End to end: ``bentoml serve`` in a subprocess, called with ``bentoml.SyncHTTPClient``; and
``bentoml build`` of the repository's bentofile."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import httpx
import hypothesis
import numpy as np
import pytest
import schemathesis
import yaml
from bentoml.exceptions import BentoMLException
from bundle_factory import tamper
from PIL import Image
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from service_helpers import BENTOML, REPO, ServerExited, bentoml_serve, gradient, image_bytes

from aegan_core.bundle import load_bundle
from aegan_core.cuda import check_in_subprocess
from aegan_core.images import load_uploads
from aegan_core.runtime import ModelRuntime

SERVER_PIDS: dict[str, int] = {}  # base URL -> pid of its `bentoml serve` process


@pytest.fixture(scope="module")
def server(image_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The service from the BentoML model store, with two limits lowered by environment."""
    with bentoml.models.create("aegan-e2e-test") as model:
        for item in image_bundle.iterdir():
            shutil.copy2(item, Path(model.path) / item.name)
    env = {
        **os.environ,
        "AEGAN_MODEL": f"bentoml:{model.tag}",
        "AEGAN_DEVICE": "auto",
        "AEGAN_MAX_IMAGES": "3",
        "AEGAN_MAX_UPLOAD_BYTES": "20000",
    }
    log = tmp_path_factory.mktemp("e2e") / "serve.log"
    try:
        with bentoml_serve("aegan_serve.service:AEGAN", env=env, log=log) as (url, process):
            SERVER_PIDS[url] = process.pid
            yield url
    finally:
        print(log.read_text(errors="replace")[-3000:])


def test_served_endpoints_through_the_python_client(server, tmp_path):
    started = time.monotonic()
    with bentoml.SyncHTTPClient(server, server_ready_timeout=90) as client:
        assert client.is_ready()
        ready_s = time.monotonic() - started
        grid = client.sample(n=4, seed=1)
        assert isinstance(grid, Image.Image) and grid.size == (62, 62)

        generated = client.generate(n=3, seed=2)
        assert len(generated["images"]) == 3 and generated["seed"] == 2
        decoded = client.decode(latents=generated["latents"])
        assert decoded["images"] == generated["images"]

        uploads = []
        for i in range(3):
            path = tmp_path / f"picture{i}.png"
            gradient((40 + 10 * i, 40)).save(path)
            uploads.append(path)
        latents = np.array(client.encode(images=uploads)["latents"])
        assert latents.shape == (3, 32)
        reconstructed = client.reconstruct(images=uploads[:2])
        assert len(reconstructed["psnr"]) == 2
        gif = client.interpolate(images=uploads[:2], steps=5)
        assert Image.open(gif).n_frames == 5
        strip = client.interpolate(seeds=[3, 4], steps=3, format="png")
        assert Image.open(strip).size == (3 * 30 + 2, 32)

        info = client.info()
        assert info["model"]["name"] == "tiny-test"
        assert info["runtime"]["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
        on_cpu = info["runtime"]["provider"] == "CPUExecutionProvider"
        assert bool(info["runtime"]["cuda_unused_reason"]) == on_cpu  # AEGAN_DEVICE=auto: why
        assert info["limits"]["AEGAN_MAX_IMAGES"] == 3  # read from the environment

        with pytest.raises(BentoMLException) as too_many:
            client.encode(images=uploads + uploads[:1])
        assert too_many.value.error_code == 400
        assert "images: List should have at most 3 items" in str(too_many.value)
        big = tmp_path / "big.bmp"
        gradient((200, 200), "RGB").save(big)  # 120 kB > AEGAN_MAX_UPLOAD_BYTES
        with pytest.raises(BentoMLException) as too_large:
            client.reconstruct(images=[big])
        assert too_large.value.error_code == 413
        assert "AEGAN_MAX_UPLOAD_BYTES" in str(too_large.value)
    print(f"server ready after {ready_s:.1f} s")


def test_served_encode_is_exact_under_many_concurrent_clients(server, image_bundle):
    """256 real HTTP requests of 1 to 3 different images from 32 threads at once: every one is
    answered 200 with exactly the latents of its own images, in order (no 5xx, nothing mixed)."""
    pictures = [gradient((28 + i, 28 + 2 * i)).rotate(7 * i) for i in range(24)]
    blobs = [image_bytes(picture) for picture in pictures]
    runtime = ModelRuntime(load_bundle(image_bundle), "cpu", 1)
    inputs = load_uploads(blobs, (1, 28, 28), max_bytes=1 << 20, max_pixels=1 << 20)
    expected = runtime.encode(inputs)
    rng = np.random.default_rng(0)
    requests = [rng.choice(len(blobs), size=int(rng.integers(1, 4))) for _ in range(256)]

    local = threading.local()  # one connection per client thread, kept alive

    def call(picks: np.ndarray) -> tuple[int, np.ndarray | str]:
        parts = [("images", (f"p{i}.png", blobs[i], "image/png")) for i in picks]
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=server, timeout=60)
        response = local.http.post("/encode", files=parts)
        if response.status_code != 200:
            return response.status_code, response.text
        return 200, np.array(response.json()["latents"])

    with bentoml.SyncHTTPClient(server, server_ready_timeout=90):
        pass  # wait until ready
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, requests))
    for picks, (status, latents) in zip(requests, answers, strict=True):
        assert status == 200, latents
        # 1e-5: the same graph on a batch of other rows; measured differences are below 1e-6
        np.testing.assert_allclose(latents, expected[picks], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("tampered", "does not match its manifest"),
        ("AEGAN_MAX_N=many", "AEGAN_MAX_N='many' is not an integer"),
        ("AEGAN_MODEL=/nonexistent/bundle", "/nonexistent/bundle"),
        ("AEGAN_DEVICE=cuda", "AEGAN_DEVICE=cuda but CUDA is not usable here: "),
        ("AEGAN_API_KEYS_FILE=/nonexistent/keys.json", "cannot read the keys file"),
        ("AEGAN_API_KEYS_FILE=bad-keys", "is not JSON"),
        ("AEGAN_RATE_LIMIT_STORAGE=redis://cache:port", "AEGAN_RATE_LIMIT_STORAGE"),
        ("AEGAN_QUOTA_IMAGES_PER_S=lots", "AEGAN_QUOTA_IMAGES_PER_S='lots' is not a number"),
    ],
)
def test_a_misconfigured_server_exits_with_the_reason(image_bundle, tmp_path, setting, message):
    """Not a crash loop of workers behind an open port: the process ends, non-zero, and says why."""
    if setting == "AEGAN_DEVICE=cuda" and check_in_subprocess() is None:
        pytest.skip("CUDA is usable here")
    bundle = tmp_path / "bundle"
    shutil.copytree(image_bundle, bundle)
    env = {**os.environ, "AEGAN_MODEL": str(bundle), "AEGAN_DEVICE": "cpu"}
    if setting == "tampered":
        tamper(bundle)
    else:
        key, value = setting.split("=", 1)
        env[key] = value
        if value == "bad-keys":
            env[key] = str(tmp_path / "keys.json")
            (tmp_path / "keys.json").write_text('{"version": 1, "keys": [')
    started = time.monotonic()
    serve = bentoml_serve("aegan_serve.service:AEGAN", env=env, log=tmp_path / "serve.log")
    with pytest.raises(ServerExited) as exited, serve:
        pass  # a server that came up anyway would end the block without the exception
    assert "Address already in use" not in exited.value.output, exited.value.output
    assert exited.value.returncode != 0
    assert message in exited.value.output
    print(f"exited with {exited.value.returncode} after {time.monotonic() - started:.1f} s")


def test_served_health_and_metrics(server):
    with bentoml.SyncHTTPClient(server, server_ready_timeout=90) as client:
        client.generate(n=1)
    for path in ("/livez", "/readyz"):
        assert urllib.request.urlopen(server + path, timeout=10).status == 200
    metrics = urllib.request.urlopen(server + "/metrics", timeout=10).read().decode()
    assert "bentoml_service_request_total" in metrics
    assert 'endpoint="/generate"' in metrics
    count = re.search(r"^aegan_encoder_batch_images_count(?:\{[^}]*\})? (\S+)$", metrics, re.M)
    assert count and float(count.group(1)) > 0, metrics[-2000:]  # the encoder runs of every worker
    fallbacks = re.search(r"^aegan_cuda_fallbacks_total(?:\{[^}]*\})? (\S+)$", metrics, re.M)
    assert fallbacks and float(fallbacks.group(1)) == 0, metrics[-2000:]  # no GPU failed here


@pytest.mark.slow
def test_bentoml_build_packages_the_bundle_without_torch(image_bundle, tmp_path):
    tree = tmp_path / "clone"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if name.startswith(("aegan_serve/", "models/", "docs/")) or name in (
            "bentofile.yaml",
            "requirements-serve.txt",
        ):
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    shipped = tree / "models" / "fashion-mnist"
    if not (shipped / "manifest.json").is_file():  # until the trained bundle is committed
        shutil.copytree(image_bundle, shipped, dirs_exist_ok=True)
    home = tmp_path / "bentoml-home"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    build = subprocess.run(
        [str(BENTOML), "build", "--output", "tag"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (bento,) = [p for p in (home / "bentos" / "aegan").iterdir() if p.name != "latest"]
    for name in ("manifest.json", "generator.onnx", "encoder.onnx"):
        assert (bento / "src" / "models" / "fashion-mnist" / name).is_file()
    assert (bento / "src" / "aegan_serve" / "service.py").is_file()
    lines = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    packages = {re.split(r"[\s=<>!~;\[]", line)[0].lower() for line in lines if line[:1].isalpha()}
    assert {"bentoml", "onnxruntime-gpu", "numpy", "pillow"} <= packages
    assert not packages & {"torch", "torchvision", "onnx", "onnxscript"}, packages
    meta = yaml.safe_load((bento / "bento.yaml").read_text())
    assert meta["service"] == "aegan_serve.service:AEGAN"
    assert {route["route"] for route in meta["schema"]["routes"]} >= {
        "/sample",
        "/generate",
        "/encode",
        "/decode",
        "/reconstruct",
        "/interpolate",
    }


def test_generated_requests_get_no_5xx_and_answers_that_match_the_document(server):
    """Property-based requests generated from the service's own OpenAPI document, valid ones and
    invalid ones, for each of its operations, with every check schemathesis has: no 5xx; status
    codes, content types, headers and bodies as documented; every invalid request refused; every
    valid one accepted, except on the upload endpoints, where any bytes are a valid upload by the
    document but only images are accepted (docs/RELIABILITY.md). The longer run: bench/fuzz.py."""
    with bentoml.SyncHTTPClient(server, server_ready_timeout=90):
        pass
    schema = schemathesis.openapi.from_url(server + "/docs.json")
    spec = schema.raw_schema
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 11  # the endpoints, health and metrics
    for operation in operations:
        content = spec["paths"][operation.path][operation.method.lower()].get("requestBody", {})
        uploads = "multipart/form-data" in content.get("content", {})
        # any bytes are a valid upload by the document: only images are accepted
        check_generated_requests(operation, [positive_data_acceptance] if uploads else [])


def check_generated_requests(operation, excluded_checks) -> None:
    """30 generated requests, valid and invalid, to ``operation``, with every check but those
    excluded."""
    strategy = hypothesis.strategies.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )

    @hypothesis.given(case=strategy)
    @hypothesis.settings(
        max_examples=30,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        derandomize=True,  # the same requests on every run
        database=None,
    )
    def check(case) -> None:
        case.call_and_validate(excluded_checks=excluded_checks, timeout=60)

    check()


def test_a_worker_killed_under_load_is_replaced_and_no_request_hangs(server):
    """SIGKILL of a worker in the middle of a load: the requests it held fail fast at the
    connection (nothing hangs, nothing is answered 5xx), the others are answered, a new worker
    takes its place and the server answers again within seconds. Last in this module: it
    disturbs the shared server."""
    import psutil

    def workers() -> set[int]:
        found = set()
        for process in psutil.Process(SERVER_PIDS[server]).children(recursive=True):
            try:  # a killed worker stays a zombie until its supervisor reaps it
                if process.status() != psutil.STATUS_ZOMBIE and "_bentoml_impl.worker" in " ".join(
                    process.cmdline()
                ):
                    found.add(process.pid)
            except psutil.Error:
                continue
        return found

    with bentoml.SyncHTTPClient(server, server_ready_timeout=90):
        pass
    before = workers()
    stop = time.monotonic() + 6
    outcomes: list[tuple[str, float]] = []

    def client() -> None:
        with httpx.Client(base_url=server, timeout=60) as http:
            while time.monotonic() < stop:
                started = time.monotonic()
                try:
                    status = str(http.post("/generate", json={"n": 4}).status_code)
                except httpx.TransportError as exc:  # the connection of a killed worker
                    status = type(exc).__name__
                outcomes.append((status, time.monotonic() - started))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    os.kill(min(before), signal.SIGKILL)
    for thread in threads:
        thread.join()
    statuses = {status for status, _ in outcomes}
    assert "200" in statuses and not {s for s in statuses if s[0] in "45"}, statuses
    assert max(seconds for _, seconds in outcomes) < 10  # failed or answered, never stuck
    deadline = time.monotonic() + 30
    while len(workers() - before) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(workers()) == len(before) and workers() != before  # replaced
    assert httpx.post(server + "/generate", json={"n": 1}, timeout=30).status_code == 200
