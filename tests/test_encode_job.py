"""``aegan encode``: a folder of real Fashion-MNIST test images with broken files among them,
encoded locally and on Ray Data, gives the latents and the errors of the service's ``/encode``."""

from __future__ import annotations

import fcntl
import gzip
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_aegan, run_aegan_without
from click.testing import CliRunner
from encode_helpers import DyingReader
from fmnist_data import FMNIST, needs_fmnist, require_fmnist
from PIL import Image
from service_helpers import files, png_header, serve

from aegan_batch import JOB_FILE, LOCK_FILE, plan_job, run_job
from aegan_batch import inputs as batch_inputs
from aegan_batch import job as batch_job
from aegan_cli import main
from aegan_core.bundle import DEFAULT_MODEL_DIR, load_bundle
from aegan_core.runtime import ModelRuntime

pq = pytest.importorskip("pyarrow.parquet", reason="the 'batch' extra (pyarrow) is not installed")

pytestmark = needs_fmnist
ROOT = Path(__file__).resolve().parents[1]
IMAGES = 300
CHUNK = 64  # 5 parts of the 300 images and the broken files
TOLERANCE = 1e-5
BROKEN = {  # file -> words its error must contain
    "broken/truncated.png": "truncated",
    "broken/notes.png": "not a readable image",
    "broken/empty.png": "is empty",
    "broken/deep/bomb.png": "pixels",
}


def fmnist_test_images(count: int) -> tuple[np.ndarray, np.ndarray]:
    def idx(name: str, offset: int) -> np.ndarray:
        return np.frombuffer(gzip.decompress((FMNIST / name).read_bytes()), np.uint8, offset=offset)

    images = idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)[:count]
    return images, idx("t10k-labels-idx1-ubyte.gz", 8)[:count]


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 Fashion-MNIST test images as PNG in nested folders (every tenth an RGB JPEG at twice
    the size, so conversion and resizing are exercised too), plus four broken files."""
    require_fmnist()
    root = tmp_path_factory.mktemp("collection")
    images, labels = fmnist_test_images(IMAGES)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / f"class-{label}" / f"batch-{i // 100}"
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image)
        if i % 10 == 0:
            picture.convert("RGB").resize((56, 56)).save(folder / f"{i:04d}.jpg", quality=90)
        else:
            picture.save(folder / f"{i:04d}.png")
    (root / "broken" / "deep").mkdir(parents=True)
    good = next(root.rglob("0001.png")).read_bytes()
    (root / "broken" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "broken" / "notes.png").write_text("not an image at all\n")
    (root / "broken" / "empty.png").write_bytes(b"")
    (root / "broken" / "deep" / "bomb.png").write_bytes(png_header(100_000, 100_000))
    (root / "README.txt").write_text("a folder source reads image files only\n")
    return root


def encode(*args: str | Path) -> str:
    """Run ``aegan encode`` in this process; its output."""
    result = CliRunner().invoke(main, ["encode", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def read(dest: Path) -> dict:
    """id -> (latent or None, error or None) of a job's output (all parts as one table)."""
    table = pq.read_table(dest).to_pydict()
    return {
        i: (None if z is None else np.asarray(z, np.float32), e)
        for i, z, e in zip(table["id"], table["latent"], table["error"], strict=True)
    }


@pytest.fixture(scope="module")
def local_job(collection: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    dest = tmp_path_factory.mktemp("jobs") / "local"
    output = encode(collection, "--out", dest, "--chunk-size", CHUNK, "--batch-size", 32)
    return dest, output


@pytest.fixture(scope="module")
def service_answers(collection: Path) -> dict[str, tuple[list[float] | None, str | None]]:
    """What the service's /encode answers for each file: its latent, or its error message (for a
    request holding that file alone, whose name in the message is ``images[0]``)."""
    paths = sorted(p for p in collection.rglob("*") if p.suffix in (".png", ".jpg"))
    answers: dict[str, tuple[list[float] | None, str | None]] = {}
    with serve(DEFAULT_MODEL_DIR, AEGAN_WORKERS="1") as client:
        good = [p for p in paths if p.relative_to(collection).as_posix() not in BROKEN]
        for start in range(0, len(good), 64):
            batch = good[start : start + 64]
            response = client.post("/encode", files=files(*(p.read_bytes() for p in batch)))
            assert response.status_code == 200, response.text
            for path, z in zip(batch, response.json()["latents"], strict=True):
                answers[path.relative_to(collection).as_posix()] = (z, None)
        for name in BROKEN:
            response = client.post("/encode", files=files((collection / name).read_bytes()))
            assert 400 <= response.status_code < 500, response.text
            answers[name] = (None, response.json()["error"])
    return answers


def test_latents_and_errors_are_the_services(local_job, service_answers):
    dest, output = local_job
    rows = read(dest)
    assert sorted(rows) == sorted(service_answers)  # README.txt is not an input
    assert len(rows) == IMAGES + len(BROKEN)
    worst = 0.0
    for name, (latent, error) in rows.items():
        expected_latent, expected_error = service_answers[name]
        if expected_error is None:
            assert error is None, (name, error)
            worst = max(worst, float(np.abs(latent - np.asarray(expected_latent)).max()))
        else:
            assert latent is None
            assert error.replace(name, "images[0]") == expected_error  # the same message
            assert BROKEN[name] in error
    assert worst <= TOLERANCE
    assert sorted(p.name for p in dest.iterdir()) == [JOB_FILE, LOCK_FILE] + [
        f"part-{i:05d}.parquet" for i in range(5)
    ]
    summary = output.strip().splitlines()[-1]
    assert f"{IMAGES + len(BROKEN)} inputs, {IMAGES} encoded, {len(BROKEN)} errors" in summary
    assert re.search(r"\d images/s$", summary), summary
    for name in BROKEN:
        assert f"error: {name}" in output


def test_the_comparison_sees_a_one_grey_level_difference(local_job, collection):
    """The 1e-5 agreement above means something: pixels read one grey level brighter (1/255 of
    the range) move the latents far more than that."""
    rows = read(local_job[0])
    names = [n for n in sorted(rows) if n.endswith(".png") and n not in BROKEN][:32]
    pixels = np.stack([np.asarray(Image.open(collection / n))[None] for n in names])
    model = ModelRuntime(load_bundle(DEFAULT_MODEL_DIR), "cpu", 1)
    brighter = model.encode(pixels.astype(np.float32) / 127.5 - 1.0 + 1 / 127.5)
    ours = np.stack([rows[n][0] for n in names])
    assert np.abs(brighter - ours).max() > 1000 * TOLERANCE


def test_a_restart_rewrites_only_the_missing_part(local_job, collection, tmp_path):
    dest = tmp_path / "restart"
    shutil.copytree(local_job[0], dest)
    before = {p.name: p.stat().st_mtime_ns for p in dest.glob("part-*.parquet")}
    (dest / "part-00002.parquet").unlink()
    (dest / ".tmp-stopped.parquet").write_bytes(b"PAR1")  # a write cut short by a crash
    output = encode(collection, "--out", dest, "--chunk-size", CHUNK, "--batch-size", 32)
    assert not (dest / ".tmp-stopped.parquet").exists()
    after = {p.name: p.stat().st_mtime_ns for p in dest.glob("part-*.parquet")}
    assert after.keys() == before.keys()
    assert {n for n in after if after[n] != before[n]} == {"part-00002.parquet"}
    assert "4 of 5 parts already written (240 inputs), skipped" in output
    assert "304 inputs, 64 encoded, 0 errors, 240 skipped" in output  # broken/ sorts first
    expected = read(local_job[0])
    for name, (latent, error) in read(dest).items():
        assert error == expected[name][1]
        if latent is not None:
            np.testing.assert_array_equal(latent, expected[name][0])


def test_a_restart_with_other_settings_is_refused(local_job, collection, tmp_path):
    dest = tmp_path / "other"
    shutil.copytree(local_job[0], dest)
    (dest / "part-00000.parquet").unlink()
    before = sorted(p.name for p in dest.iterdir())
    runner = CliRunner()
    for args, named in (
        (["--chunk-size", "50"], "chunk size (--chunk-size): 64 there, 50 now"),
        (["--chunk-size", str(CHUNK), "--model", str(tmp_path / "none")], "neither a bundle"),
    ):
        result = runner.invoke(main, ["encode", str(collection), "--out", str(dest), *args])
        assert result.exit_code == 1, result.output
        assert named in result.output
    sub = collection / "broken"
    result = runner.invoke(main, ["encode", str(sub), "--out", str(dest), "--chunk-size", "64"])
    assert result.exit_code == 1
    assert "holds the output of another job (source:" in result.output
    assert sorted(p.name for p in dest.iterdir()) == before  # nothing written


def test_dest_must_be_a_new_or_empty_directory(collection, tmp_path):
    runner = CliRunner()
    (tmp_path / "file.parquet").write_bytes(b"PAR1")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine\n")
    for dest, message in (
        ("file.parquet", "is a file; --out names a directory of Parquet parts"),
        ("used", "is not empty and holds no _job.json"),
    ):
        result = runner.invoke(main, ["encode", str(collection), "--out", str(tmp_path / dest)])
        assert result.exit_code == 1
        assert message in result.output
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine\n"


def test_a_dest_named_parquet_is_one_table(collection, local_job, tmp_path):
    """A list of paths as SOURCE, one worker (in-process), DEST ending in .parquet."""
    expected = read(local_job[0])
    png, jpg = (next(n for n in sorted(expected) if n.endswith(s)) for s in ("1.png", "0.jpg"))
    listed = [png, "broken/empty.png", jpg]
    relative = {name: os.path.relpath(collection / name, tmp_path) for name in listed}
    (tmp_path / "list.txt").write_text(
        "# paths relative to this file\n\n" + "".join(f"{p}\n" for p in relative.values())
    )
    dest = tmp_path / "latents.parquet"
    encode(tmp_path / "list.txt", "--out", dest, "--workers", 1)
    rows = read(dest)
    assert sorted(rows) == sorted(relative.values())
    for name, as_listed in relative.items():
        latent, error = rows[as_listed]
        if expected[name][1] is not None:
            assert error == expected[name][1].replace(name, as_listed)
        else:
            np.testing.assert_allclose(latent, expected[name][0], atol=TOLERANCE, rtol=0)


def test_processes_give_the_same_latents(collection, local_job, tmp_path):
    plan = plan_job(collection, DEFAULT_MODEL_DIR, tmp_path / "processes", 1000)
    summary = run_job(plan, workers=2, batch_size=100, device="cpu", pool="processes")
    assert (summary.encoded, summary.errors, summary.parts) == (IMAGES, len(BROKEN), 1)
    expected = read(local_job[0])
    for name, (latent, error) in read(tmp_path / "processes").items():
        assert error == expected[name][1]
        if latent is not None:
            np.testing.assert_allclose(latent, expected[name][0], atol=TOLERANCE, rtol=0)


def test_an_npy_array_encodes_like_its_images(collection, local_job, tmp_path):
    """Rows of an .npy are ids 0..N-1; uint8 pixels give the latents of the same images as PNG
    files, floats in [0, 1] too, and a row holding NaN is an error row."""
    images, labels = fmnist_test_images(IMAGES)
    expected = read(local_job[0])
    names = {i: f"class-{labels[i]}/batch-{i // 100}/{i:04d}.png" for i in range(IMAGES) if i % 10}
    as_float = images[:, None].astype(np.float32) / 255
    as_float[7, 0, 3, 3] = np.nan
    for array, name in ((images[:, None], "uint8.npy"), (as_float, "float.npy")):
        np.save(tmp_path / name, array)
        dest = tmp_path / f"{name}-out"
        encode(tmp_path / name, "--out", dest, "--chunk-size", 128)
        table = pq.read_table(dest)
        assert table.schema.field("id").type == "int64"
        rows = read(dest)
        assert sorted(rows) == list(range(IMAGES))
        for i, path in names.items():
            latent, error = rows[i]
            if name == "float.npy" and i == 7:
                assert latent is None and error == "row 7 holds NaN or infinite values"
                continue
            assert error is None
            np.testing.assert_allclose(latent, expected[path][0], atol=TOLERANCE, rtol=0)
    np.save(tmp_path / "wrong.npy", images[:4])  # N x 28 x 28: no channel axis
    result = CliRunner().invoke(
        main, ["encode", str(tmp_path / "wrong.npy"), "--out", str(tmp_path / "w")]
    )
    assert result.exit_code == 1
    assert "array of shape (4, 28, 28)" in result.output and "(1, 28, 28)" in result.output


def test_vector_models_encode_npy_rows(vector_bundle, collection, tmp_path):
    """A vector model takes an .npy of N x D vectors as stored; a folder of images is refused."""
    vectors = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32)
    np.save(tmp_path / "vectors.npy", vectors)
    encode(tmp_path / "vectors.npy", "--model", vector_bundle, "--out", tmp_path / "z")
    rows = read(tmp_path / "z")
    model = ModelRuntime(load_bundle(vector_bundle), "cpu", 1)
    expected = model.encode(vectors)
    got = np.stack([rows[i][0] for i in range(50)])
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    result = CliRunner().invoke(
        main, ["encode", str(collection), "--model", str(vector_bundle), "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "is a vector model (data shape [2]); give it an .npy array of vectors" in result.output


@pytest.mark.slow
def test_ray_gives_the_same_table_and_skips_written_parts(collection, local_job, tmp_path):
    """``aegan encode --ray`` on a Ray instance started on this machine (two actors), in a DEST
    that already holds the local job's last part: it writes the four others, and the table is
    the local one."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("the 'ray' extra is not installed (scripts/setup.sh installs it)")
    dest = tmp_path / "ray"
    dest.mkdir()
    for name in (JOB_FILE, "part-00004.parquet"):
        shutil.copy2(local_job[0] / name, dest / name)
    kept = (dest / "part-00004.parquet").stat().st_mtime_ns
    args = ["--out", str(dest), "--chunk-size", str(CHUNK), "--batch-size", "32", "--workers", "2"]
    result = run_aegan(["encode", str(collection), *args, "--ray"], timeout=240)
    assert result.returncode == 0, result.stderr
    assert f"304 inputs, 252 encoded, {len(BROKEN)} errors, 48 skipped" in result.stdout
    assert "images/s (CPUExecutionProvider)" in result.stdout  # the actors ran on the CPU
    assert (dest / "part-00004.parquet").stat().st_mtime_ns == kept
    expected, rows = read(local_job[0]), read(dest)
    assert rows.keys() == expected.keys()
    for name, (latent, error) in rows.items():
        assert error == expected[name][1]
        if latent is not None:
            np.testing.assert_allclose(latent, expected[name][0], atol=TOLERANCE, rtol=0)


def _group_members(pgid: int) -> list[int]:
    """Processes of the process group ``pgid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_ray_address_joins_a_running_cluster(collection, local_job, tmp_path):
    """``--ray-address`` on a one-node cluster that ``ray start --head`` runs (its own HOME and
    temporary folder, so nothing is shared with another Ray on the machine): the actors write the
    parts, and the table is the local one. The head and everything it started are one process
    group, ended at the end."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("the 'ray' extra is not installed (scripts/setup.sh installs it)")
    source = tmp_path / "src"
    names = small_folder(collection, source, 40)
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "ray.log"
    ray_dir = tempfile.mkdtemp(prefix="aegan-ray-")  # short: Ray's socket paths are limited
    with open(log, "wb") as out:
        head = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block"]
            + ["--num-cpus", "1", "--disable-usage-stats", "--include-dashboard", "false"]
            + ["--port", str(port), "--temp-dir", ray_dir],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while b"Ray runtime started" not in log.read_bytes():
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        dest = tmp_path / "out"
        args = ["encode", str(source), "--out", str(dest), "--ray-address", f"127.0.0.1:{port}"]
        result = run_aegan([*args, "--chunk-size", "16", "--no-progress"], env=env)
    finally:
        if _group_members(head.pid):
            os.killpg(head.pid, signal.SIGKILL)  # no 30 s drain: the cluster is thrown away
        head.wait(30)
        deadline = time.monotonic() + 10
        while _group_members(head.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert not _group_members(head.pid)
    assert result.returncode == 0, result.stderr
    assert "40 inputs, 40 encoded, 0 errors, 0 skipped" in result.stdout
    assert sorted(p.name for p in dest.glob("part-*")) == [
        f"part-0000{i}.parquet" for i in range(3)
    ]
    expected = {Path(k).name: v for k, v in read(local_job[0]).items()}
    rows = read(dest)
    assert sorted(rows) == sorted(names)
    for name, (latent, error) in rows.items():
        assert error is None
        np.testing.assert_allclose(latent, expected[name][0], atol=TOLERANCE, rtol=0)


# Stand-ins for installs without the 'batch' or the 'ray' extra.
@pytest.mark.parametrize(
    ("missing", "extra", "flags"), [("pyarrow", "batch", []), ("ray", "ray", ["--ray"])]
)
def test_encode_names_the_extra_it_needs(collection, tmp_path, missing, extra, flags):
    dest = tmp_path / "out"
    args = ["encode", str(collection), "--out", str(dest), *flags]
    result = run_aegan_without((missing,), args, tmp_path)
    assert result.returncode == 1, result.stderr
    assert f"install the {extra!r} extra: pip install 'aegan-serve[{extra}]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not dest.exists()  # refused before anything was written


def test_job_record_names_model_and_chunking(local_job):
    record = json.loads((local_job[0] / JOB_FILE).read_text())
    manifest = json.loads((DEFAULT_MODEL_DIR / "manifest.json").read_text())
    assert record["model"] == {
        "name": manifest["name"],
        "encoder_sha256": manifest["files"]["encoder"]["sha256"],
    }
    assert (record["chunk_size"], record["inputs"], record["source_kind"]) == (CHUNK, 304, "folder")


def small_folder(collection: Path, root: Path, count: int = 12) -> list[str]:
    """``count`` good images of the collection copied into ``root`` (flat); their names there."""
    root.mkdir(parents=True, exist_ok=True)
    good = sorted(p for p in collection.rglob("*.png") if "broken" not in p.parts)[:count]
    for path in good:
        shutil.copy2(path, root / path.name)
    return [p.name for p in good]


def test_a_file_name_that_is_not_utf8_is_encoded(collection, tmp_path):
    """A name with a byte that is not UTF-8 (possible on Linux) is encoded like any other file;
    its id is the name with that byte written as \\xNN, and the list of inputs hashes its bytes."""
    source = tmp_path / "names"
    names = small_folder(collection, source, 3)
    data = (source / names[0]).read_bytes()
    with open(os.path.join(os.fsencode(source), b"bad\xff.png"), "wb") as f:
        f.write(data)
    (source / "folder.png").mkdir()  # named like an image: not an input
    dest = tmp_path / "out"
    output = encode(source, "--out", dest, "--chunk-size", 2)
    assert "4 inputs, 4 encoded, 0 errors" in output
    rows = read(dest)
    assert sorted(rows) == sorted([*names, "bad\\xff.png"])
    np.testing.assert_array_equal(rows["bad\\xff.png"][0], rows[names[0]][0])
    assert "4 inputs, 0 encoded, 0 errors, 4 skipped" in encode(
        source, "--out", dest, "--chunk-size", 2
    )


def test_an_exception_in_conversion_is_an_error_row(collection, tmp_path, monkeypatch):
    """Any exception while converting one input (here a ValueError from the converter, for an
    image of an odd size) is that input's error row, TypeName: message; the job goes on."""
    source = tmp_path / "odd"
    names = small_folder(collection, source, 6)
    Image.new("L", (31, 31), 128).save(source / "odd.png")
    convert = batch_inputs.to_model_input

    def failing(image, shape):
        if image.size == (31, 31):
            raise ValueError("cannot convert this one")
        return convert(image, shape)

    monkeypatch.setattr(batch_inputs, "to_model_input", failing)
    dest = tmp_path / "out"
    output = encode(source, "--out", dest, "--batch-size", 4, "--pool", "threads")  # the patch
    assert "7 inputs, 6 encoded, 1 errors" in output
    assert "error: odd.png: ValueError: cannot convert this one" in output
    rows = read(dest)
    assert rows["odd.png"] == (None, "odd.png: ValueError: cannot convert this one")
    assert all(rows[n][1] is None and rows[n][0] is not None for n in names)


def test_a_worker_process_that_dies_costs_only_its_input(collection, local_job, tmp_path):
    """With --pool processes, an input whose reading kills the worker process is the one error
    row (the batches lost with the process are run again); every other row is encoded."""
    source = tmp_path / "dying"
    names = small_folder(collection, source, 20)
    fatal = names[9]
    plan = plan_job(source, DEFAULT_MODEL_DIR, tmp_path / "out", 100)
    reader = DyingReader(**vars(plan.reader()), fatal=fatal)
    summary = run_job(plan, workers=2, batch_size=4, device="cpu", pool="processes", reader=reader)
    plan.release()
    assert (summary.encoded, summary.errors) == (19, 1)
    rows = read(tmp_path / "out")
    latent, error = rows[fatal]
    assert latent is None
    assert error == (
        f"{fatal}: BrokenProcessPool: the worker process died while reading or encoding this input"
    )
    expected = {Path(k).name: v for k, v in read(local_job[0]).items()}
    for name in names:
        if name != fatal:
            assert rows[name][1] is None
            np.testing.assert_allclose(rows[name][0], expected[name][0], atol=TOLERANCE, rtol=0)


def test_a_restart_on_changed_inputs_is_refused(collection, tmp_path):
    """An image rewritten under the same name, or an .npy replaced by another of the same shape,
    makes a restart refuse: its parts would mix old and new results."""
    source = tmp_path / "changing"
    names = small_folder(collection, source, 6)
    dest = tmp_path / "out"
    encode(source, "--out", dest, "--chunk-size", 2)
    (dest / "part-00001.parquet").unlink()
    before = sorted(p.name for p in dest.iterdir())
    changed = source / names[4]
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    runner = CliRunner()
    result = runner.invoke(main, ["encode", str(source), "--out", str(dest), "--chunk-size", "2"])
    assert result.exit_code == 1, result.output
    assert "files changed since its parts were written" in result.output
    assert "modification time of an input of part-00002.parquet differs)" in result.output
    assert f"To start over, delete {dest} or write to another --out" in result.output
    assert sorted(p.name for p in dest.iterdir()) == before  # nothing written

    array = np.zeros((5, 1, 28, 28), np.uint8)
    np.save(tmp_path / "a.npy", array)
    encode(tmp_path / "a.npy", "--out", tmp_path / "npy-out", "--chunk-size", 2)
    (tmp_path / "npy-out" / "part-00000.parquet").unlink()
    time.sleep(0.01)
    np.save(tmp_path / "a.npy", array + 1)  # same shape, dtype and size: other values
    result = runner.invoke(
        main,
        [
            "encode",
            str(tmp_path / "a.npy"),
            "--out",
            str(tmp_path / "npy-out"),
            "--chunk-size",
            "2",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "the .npy array changed since its parts were written (mtime_ns " in result.output

    record = json.loads((dest / JOB_FILE).read_text())
    (dest / JOB_FILE).write_text(json.dumps({**record, "format_version": 1}))
    result = runner.invoke(main, ["encode", str(source), "--out", str(dest), "--chunk-size", "2"])
    assert result.exit_code == 1, result.output
    assert "was written by another version of aegan encode (format 1; this one" in result.output


def test_a_part_that_is_not_whole_is_rewritten(local_job, collection, tmp_path):
    """A part with fewer rows than its chunk, or not Parquet at all, is written again."""
    import pyarrow.parquet as pq_module

    dest = tmp_path / "parts"
    shutil.copytree(local_job[0], dest)
    short = pq_module.read_table(dest / "part-00001.parquet").slice(0, 10)
    pq_module.write_table(short, dest / "part-00001.parquet")
    (dest / "part-00003.parquet").write_bytes(b"PAR1 not really")
    output = encode(collection, "--out", dest, "--chunk-size", CHUNK, "--batch-size", 32)
    assert "3 of 5 parts already written (176 inputs), skipped" in output
    assert "304 inputs, 128 encoded, 0 errors, 176 skipped" in output
    for i in (1, 3):
        assert pq_module.read_metadata(dest / f"part-0000{i}.parquet").num_rows == CHUNK
    expected = read(local_job[0])
    for name, (latent, error) in read(dest).items():
        assert error == expected[name][1]
        if latent is not None:
            np.testing.assert_array_equal(latent, expected[name][0])


def test_a_second_run_on_the_same_dest_is_refused(collection, tmp_path):
    """While one run holds DEST's lock another is refused, and deletes none of its files."""
    source = tmp_path / "locked"
    small_folder(collection, source, 4)
    dest = tmp_path / "out"
    encode(source, "--out", dest)
    (dest / ".tmp-in-progress.parquet").write_bytes(b"PAR1")  # the first run's write
    with open(dest / LOCK_FILE, "wb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_aegan(["encode", str(source), "--out", str(dest)])
    assert result.returncode == 1, result.stderr
    assert f"{dest} is in use by another aegan encode" in result.stderr
    assert (dest / ".tmp-in-progress.parquet").exists()
    assert "4 inputs, 0 encoded, 0 errors, 4 skipped" in encode(source, "--out", dest)


def test_an_npy_job_keeps_no_list_of_ids_and_its_time_counts_listing(tmp_path, monkeypatch):
    """The ids of an .npy are a range (no string per row), and a job's seconds start before the
    source is listed."""
    np.save(tmp_path / "a.npy", np.zeros((3000, 1, 28, 28), np.uint8))
    listing = batch_job.list_inputs

    def slow_listing(*args):
        time.sleep(0.5)
        return listing(*args)

    monkeypatch.setattr(batch_job, "list_inputs", slow_listing)
    plan = plan_job(tmp_path / "a.npy", DEFAULT_MODEL_DIR, tmp_path / "out", 1000)
    assert plan.inputs.names == range(3000)
    summary = run_job(plan, workers=1, batch_size=500, device="cpu", pool="threads")
    plan.release()
    assert summary.seconds >= 0.5
    assert pq.read_table(tmp_path / "out")["id"].to_pylist() == list(range(3000))
