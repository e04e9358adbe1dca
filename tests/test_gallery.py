"""``aegan index`` and ``aegan similar``: a gallery built from an ``aegan encode`` output, tied to
its bundle, searched exactly or approximately, rebuilt whole; and many queries searched in batch."""

from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_aegan
from click.testing import CliRunner
from PIL import Image

from aegan_batch import plan_job, run_job
from aegan_batch.index import build_gallery, recall_at_10
from aegan_cli import main
from aegan_core.bundle import load_bundle, sha256_file
from aegan_core.errors import RequestError
from aegan_core.gallery import (
    APPROXIMATE,
    EXACT,
    INDEX_FILE,
    INDEX_VERSION,
    Gallery,
    GalleryError,
    GalleryNotFound,
    Ids,
    exact_distances,
    exact_search,
    load_faiss,
    load_gallery,
)
from aegan_core.runtime import ModelRuntime

pq = pytest.importorskip("pyarrow.parquet", reason="the 'batch' extra (pyarrow) is not installed")

PICTURES = 40


def make_collection(root: Path, count: int = PICTURES, seed: int = 0) -> Path:
    """``count`` distinct grey pictures in nested folders, and one file that is not an image."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"group-{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((28, 28)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    (root / "broken.png").write_bytes(b"not a picture")
    return root


def encode_to(source: Path, bundle: Path, dest: Path, chunk: int = 16) -> Path:
    plan = plan_job(source, bundle, dest, chunk)
    try:
        run_job(plan, workers=1, batch_size=8, device="cpu", pool="threads")
    finally:
        plan.release()
    return dest


def invoke(*args: str | Path) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def refused(*args: str | Path) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    return result.output


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_collection(tmp_path_factory.mktemp("pictures"))


@pytest.fixture(scope="module")
def encoded(collection: Path, image_bundle: Path, tmp_path_factory) -> Path:
    return encode_to(collection, image_bundle, tmp_path_factory.mktemp("encoded") / "out")


@pytest.fixture(scope="module")
def gallery_dir(encoded: Path, image_bundle: Path, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("gallery") / "out"
    shutil.copytree(encoded, dest)
    output = invoke("index", dest, "--model", image_bundle)
    assert f"exact gallery of {PICTURES} latents" in output
    return dest


def all_latents(dest: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(dest).to_pydict()
    return {
        i: np.asarray(z, np.float32)
        for i, z, e in zip(table["id"], table["latent"], table["error"], strict=True)
        if e is None
    }


def test_an_exact_gallery_answers_what_brute_force_does(gallery_dir, image_bundle):
    gallery = load_gallery(gallery_dir, load_bundle(image_bundle))
    assert gallery.kind == EXACT and gallery.size == PICTURES
    record = json.loads((gallery_dir / INDEX_FILE).read_text())
    assert record["skipped"] == 1 and record["recall_at_10"] is None
    stored = all_latents(gallery_dir)
    names = sorted(stored)
    matrix = np.stack([stored[n] for n in names])
    rng = np.random.default_rng(1)
    queries = matrix[:5] + rng.normal(0, 0.05, (5, matrix.shape[1])).astype(np.float32)
    distances, rows = gallery.search(queries, 7)
    for q, ds, rs in zip(queries, distances, rows, strict=True):
        brute = np.linalg.norm(matrix - q, axis=1)
        order = np.argsort(brute)[:7]
        assert [gallery.ids[r] for r in rs] == [names[i] for i in order]
        np.testing.assert_allclose(ds, brute[order], rtol=1e-5)
        assert list(ds) == sorted(ds)
    # a gallery picture's nearest neighbour is itself, at distance 0
    d, r = gallery.search(matrix[[3]], 1)
    assert gallery.ids[int(r[0, 0])] == names[3] and d[0, 0] == pytest.approx(0, abs=1e-5)
    # k above the gallery's size answers every row
    assert gallery.search(queries[:1], 100)[1].shape == (1, PICTURES)
    assert gallery.describe() == {  # what /info and the CLI show
        "path": str(gallery_dir),
        "size": PICTURES,
        "kind": EXACT,
        "latent_dim": 32,
        "bundle": record["bundle"],
        "recall_at_10": None,
        "search": None,
        "skipped": 1,
    }


def test_distances_to_no_candidate_are_infinite_even_in_a_gallery_of_one():
    latents = np.array([[3.0, 4.0]], np.float32)
    queries = np.zeros((2, 2), np.float32)
    rows = np.array([[0, -1], [-1, -1]])  # what an inverted file answers past its candidates
    np.testing.assert_array_equal(
        exact_distances(latents, queries, rows), [[5.0, np.inf], [np.inf, np.inf]]
    )


def test_the_exact_search_finds_the_k_nearest_rows_for_every_k():
    rng = np.random.default_rng(3)
    # 300 rows: enough for numpy's selection to leave a row other than the k-th nearest right
    # after the k - 1 nearest for some k (a partition at the wrong place shows)
    latents = rng.normal(size=(300, 4)).astype(np.float32)
    queries = rng.normal(size=(8, 4)).astype(np.float32)
    norms = np.einsum("ij,ij->i", latents, latents)
    brute = np.linalg.norm(latents[None] - queries[:, None], axis=2)
    for k in range(1, 301):
        rows, scores = exact_search(latents, norms, queries, k)
        assert rows.shape == scores.shape == (8, k)
        for q in range(8):
            assert set(rows[q]) == set(np.argsort(brute[q])[:k]), (k, q)
            # the rows index the latents; each score is the squared distance less |q|^2
            np.testing.assert_allclose(
                scores[q] + queries[q] @ queries[q], brute[q][rows[q]] ** 2, atol=1e-4
            )


def peak_bytes(call) -> int:
    """The most memory ``call()`` held at once (numpy's arrays included)."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_exact_search_of_many_queries_holds_2_23_scores_at_a_time(tmp_path):
    """Against 4096 rows, 2048 queries make 2^23 scores: 8192 queries are searched in four passes
    of 2048, in no more memory than 2048; against more than 2^22 rows, one query a pass."""
    rng = np.random.default_rng(5)
    latents = rng.normal(size=(4096, 4)).astype(np.float32)
    gallery = Gallery(tmp_path, {"kind": EXACT, "latent_dim": 4}, latents, Ids.build(range(4096)))
    queries = rng.normal(size=(8192, 4)).astype(np.float32)
    one_pass = peak_bytes(lambda: gallery.search(queries[:2048], 1))
    assert one_pass > 4 * 2**23  # the scores of one pass are in it
    assert peak_bytes(lambda: gallery.search(queries, 1)) < 1.25 * one_pass
    # more than 2^22 rows: one query a pass
    rows = 2**22 + 1
    big = Gallery(
        tmp_path,
        {"kind": EXACT, "latent_dim": 1},
        np.zeros((rows, 1), np.float32),
        Ids.build(np.arange(rows)),
    )
    one = peak_bytes(lambda: big.search(np.ones((1, 1), np.float32), 1))
    assert peak_bytes(lambda: big.search(np.ones((2, 1), np.float32), 1)) < 1.25 * one


def test_a_missing_faiss_is_named_with_its_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss fails as if not installed
    with pytest.raises(GalleryError) as caught:
        load_faiss()
    assert str(caught.value) == (
        "this gallery's index needs faiss-cpu, which is not installed (pip install faiss-cpu)"
    )


def test_bad_queries_and_k_are_refused(gallery_dir):
    gallery = load_gallery(gallery_dir)
    good = np.zeros((1, 32), np.float32)
    for k in (0, 101):
        with pytest.raises(RequestError, match="1 to 100"):
            gallery.search(good, k)
    with pytest.raises(RequestError, match="32 values"):
        gallery.search(np.zeros((1, 31), np.float32), 3)
    bad = good.copy()
    bad[0, 4] = np.nan
    with pytest.raises(RequestError) as caught:
        gallery.search(bad, 3)
    assert str(caught.value) == "a query latent holds NaN or infinite values"
    with pytest.raises(GalleryNotFound, match="not in the gallery"):
        gallery.latent_of("no/such.png")


def test_queries_are_searched_at_the_precision_of_the_latents(gallery_dir):
    """float64 queries (as JSON gives them), as an array or as lists, answer exactly what their
    float32 rounding answers: the distances are those of float32 latents."""
    gallery = load_gallery(gallery_dir)
    queries = np.random.default_rng(4).normal(size=(3, 32))
    narrow = gallery.search(queries.astype(np.float32), 5)
    for given in (queries, queries.tolist()):
        for got, expected in zip(gallery.search(given, 5), narrow, strict=True):
            np.testing.assert_array_equal(got, expected)


def test_an_unknown_id_is_named_in_the_404_cut_at_200_characters(gallery_dir):
    gallery = load_gallery(gallery_dir)
    for id, shown in [("x" * 199 + "y", "x" * 199 + "y"), ("x" * 200 + "z", "x" * 200 + "...")]:
        with pytest.raises(GalleryNotFound) as caught:
            gallery.latent_of(id)
        assert str(caught.value) == f"id {shown!r} is not in the gallery"


def test_a_gallery_of_another_bundle_is_refused_naming_both(encoded, rgb_bundle, tmp_path):
    dest = tmp_path / "other"
    shutil.copytree(encoded, dest)
    output = refused("index", dest, "--model", rgb_bundle)
    theirs = json.loads((dest / "_job.json").read_text())["model"]["encoder_sha256"]
    ours = load_bundle(rgb_bundle).manifest["files"]["encoder"]["sha256"]
    assert theirs[:12] in output and ours[:12] in output
    assert not (dest / INDEX_FILE).exists()


def test_the_service_bundle_must_be_the_gallerys(gallery_dir, image_bundle, rgb_bundle):
    theirs, ours = load_bundle(image_bundle), load_bundle(rgb_bundle)
    with pytest.raises(GalleryError) as caught:
        load_gallery(gallery_dir, ours)
    their_sha, our_sha = (sha256_file(b.path / "manifest.json")[:12] for b in (theirs, ours))
    assert str(caught.value) == (
        f"gallery {gallery_dir} was encoded by bundle {theirs.name!r} (manifest sha256 "
        f"{their_sha}...), not by {ours.name!r} at {ours.path} (manifest sha256 {our_sha}...): "
        "its latents cannot be compared; serve the bundle it was encoded by, or encode and index "
        "the collection again with this one"
    )


def _rewritten(gallery_dir: Path, dest: Path, record=None, **arrays: np.ndarray) -> Path:
    """A copy of the gallery with ``record`` edited and files replaced, recorded as they are."""
    shutil.copytree(gallery_dir, dest)
    index = json.loads((dest / INDEX_FILE).read_text())
    for role, array in arrays.items():
        path = dest / index["files"][role]["path"]
        with open(path, "wb") as f:  # as named in the record
            np.save(f, array, allow_pickle=True)
        index["files"][role].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (dest / INDEX_FILE).write_text(json.dumps(record(index) if record else index))
    return dest


def test_each_damaged_gallery_is_refused_saying_what_to_do(gallery_dir, tmp_path):
    record = tmp_path / "unreadable" / INDEX_FILE
    _rewritten(gallery_dir, tmp_path / "unreadable")
    record.write_text("{")
    with pytest.raises(GalleryError) as caught:
        load_gallery(record.parent)
    said = str(caught.value)
    assert said.startswith(f"{record} is not readable (") and said.endswith(
        "); run `aegan index` again"
    )
    newer = lambda r: {**r, "format_version": 99}  # noqa: E731
    for name, edit, version in [("list", lambda r: [], None), ("v99", newer, 99)]:
        dest = _rewritten(gallery_dir, tmp_path / name, edit)
        with pytest.raises(GalleryError) as caught:
            load_gallery(dest)
        assert str(caught.value) == (
            f"{dest / INDEX_FILE} has format_version {version!r}; this version reads "
            f"{INDEX_VERSION}: run `aegan index {dest} --model BUNDLE` again"
        )
    dest = _rewritten(gallery_dir, tmp_path / "kind", lambda r: {**r, "kind": "tree"})
    with pytest.raises(GalleryError) as caught:
        load_gallery(dest)
    assert str(caught.value) == f"{dest / INDEX_FILE}: unknown index kind 'tree'"


def test_gallery_files_must_be_beside_the_record_whole_and_plain_arrays(gallery_dir, tmp_path):
    record = json.loads((gallery_dir / INDEX_FILE).read_text())
    size, latents_name = record["size"], record["files"]["latents"]["path"]
    ids_name = record["files"]["ids"]["path"]
    dest = tmp_path / "missing"
    shutil.copytree(gallery_dir, dest)
    (dest / ids_name).unlink()
    with pytest.raises(GalleryError) as caught:
        load_gallery(dest)
    assert str(caught.value) == f"gallery {dest}: {ids_name} is missing; run `aegan index` again"

    def elsewhere(index):  # a file that exists, but reached through a directory part
        index["files"]["latents"]["path"] = f"../missing/{latents_name}"
        return index

    outside = _rewritten(gallery_dir, tmp_path / "outside", elsewhere)
    with pytest.raises(GalleryError) as caught:
        load_gallery(outside)
    assert str(caught.value) == (
        f"gallery {outside}: ../missing/{latents_name} is missing; run `aegan index` again"
    )

    good = np.asarray(load_gallery(gallery_dir).latents)
    for name, latents in [
        ("float64", good.astype(np.float64)),
        ("narrow", good[:, :31].copy()),
        ("flat", good.reshape(-1).copy()),
    ]:
        dest = _rewritten(gallery_dir, tmp_path / name, latents=latents)
        with pytest.raises(GalleryError) as caught:
            load_gallery(dest)
        assert str(caught.value) == f"{dest / latents_name}: not ({size}, latent_dim) float32"
    dest = _rewritten(gallery_dir, tmp_path / "short", latents=good[:-1].copy())
    with pytest.raises(GalleryError) as caught:
        load_gallery(dest)
    assert str(caught.value) == f"{dest / latents_name} holds {size - 1} rows, not {size}"

    order = np.load(gallery_dir / record["files"]["order"]["path"])
    dest = _rewritten(gallery_dir, tmp_path / "ids", order=order[:-1].copy())
    with pytest.raises(GalleryError) as caught:
        load_gallery(dest)
    assert str(caught.value) == f"gallery {dest}: ids and latents differ in number; rebuild it"

    # a file that needs unpickling is never unpickled, whatever its role
    for role in record["files"]:
        if role != "index":
            dest = _rewritten(gallery_dir, tmp_path / f"pickled-{role}", **{role: np.array([{}])})
            # (the latents are memory-mapped, which refuses Python objects as well)
            with pytest.raises(ValueError, match="allow_pickle=False|memory-mapped"):
                load_gallery(dest)
            # nor a file that is a pickle, not an .npy (memory-mapping does not stop that one)
            dest = tmp_path / f"pickle-{role}"
            shutil.copytree(gallery_dir, dest)
            entry = record["files"][role]
            data = pickle.dumps(np.load(gallery_dir / entry["path"]))
            (dest / entry["path"]).write_bytes(data)
            edited = {**entry, "bytes": len(data), "sha256": sha256_file(dest / entry["path"])}
            record_of_copy = {**record, "files": {**record["files"], role: edited}}
            (dest / INDEX_FILE).write_text(json.dumps(record_of_copy))
            with pytest.raises(ValueError, match="contains pickled"):
                load_gallery(dest)


def test_the_latents_are_memory_mapped_not_read(gallery_dir, tmp_path):
    """A gallery of 100 000 latents (12.8 MB) loads holding far less than its latents."""
    count = 100_000
    latents = np.random.default_rng(6).normal(size=(count, 32)).astype(np.float32)

    def numeric(record):  # integer ids: no offsets
        del record["files"]["offsets"]
        return {**record, "size": count}

    rows = np.arange(count, dtype=np.int64)
    dest = _rewritten(gallery_dir, tmp_path / "big", numeric, latents=latents, ids=rows, order=rows)
    loaded = []
    assert peak_bytes(lambda: loaded.append(load_gallery(dest))) < latents.nbytes / 4
    np.testing.assert_array_equal(loaded[0].latent_of("99999"), latents[-1])


def test_an_incomplete_or_foreign_output_is_refused(encoded, image_bundle, tmp_path):
    dest = tmp_path / "incomplete"
    shutil.copytree(encoded, dest)
    (dest / "part-00001.parquet").unlink()
    assert "part-00001.parquet is missing" in refused("index", dest, "--model", image_bundle)
    empty = tmp_path / "plain"
    empty.mkdir()
    assert "not the output of `aegan encode`" in refused("index", empty, "--model", image_bundle)


def test_a_missing_or_altered_gallery_says_what_to_run(encoded, gallery_dir, tmp_path):
    with pytest.raises(GalleryError, match="aegan index"):
        load_gallery(encoded)  # encoded, never indexed
    with pytest.raises(GalleryError, match="not a directory"):
        load_gallery(tmp_path / "nowhere")
    dest = tmp_path / "altered"
    shutil.copytree(gallery_dir, dest)
    latents = next(dest.glob("_index-*.latents.npy"))
    data = bytearray(latents.read_bytes())
    data[-1] ^= 1
    latents.write_bytes(bytes(data))
    with pytest.raises(GalleryError) as caught:
        load_gallery(dest)
    assert str(caught.value) == (
        f"gallery {dest}: {latents.name} does not match {INDEX_FILE} (size or sha256): it was "
        "altered or truncated; run `aegan index` again"
    )


def test_a_rebuild_replaces_the_gallery_whole(gallery_dir, image_bundle, tmp_path):
    dest = tmp_path / "rebuilt"
    shutil.copytree(gallery_dir, dest)
    before = {p.name for p in dest.glob("_index-*")}
    invoke("index", dest, "--model", image_bundle)
    after = {p.name for p in dest.glob("_index-*")}
    assert len(after) == len(before) == 4  # latents, ids, offsets, order
    assert not after & before  # a new tag; the old files are gone
    assert load_gallery(dest).size == PICTURES
    assert pq.read_table(dest).num_rows == PICTURES + 1  # readers still see the parts alone


def test_an_approximate_gallery_reaches_its_recorded_recall(vector_bundle, tmp_path):
    """3000 vectors through the vector bundle's encoder, indexed with an inverted file: the
    recall@10 it
    records is what an independent check against brute force measures, and at least 0.95."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "vectors.npy", rng.normal(size=(3000, 2)).astype(np.float32))
    dest = encode_to(tmp_path / "vectors.npy", vector_bundle, tmp_path / "enc", chunk=1000)
    summary = build_gallery(dest, load_bundle(vector_bundle), kind="approximate")
    gallery = load_gallery(dest, load_bundle(vector_bundle))
    assert gallery.kind == APPROXIMATE == summary.kind and gallery.size == 3000
    assert gallery.ids[17] == "17" and gallery.ids.find("17") == 17
    assert gallery.ids.find("x") is None
    recorded = gallery.record["recall_at_10"]
    assert recorded >= 0.95 and recorded == round(summary.recall_at_10, 4)
    latents = np.asarray(gallery.latents)
    measured = recall_at_10(latents, lambda q, k: gallery.search(q, k)[1], seed=5)
    assert measured >= 0.9
    queries = latents[:20] + 0.01
    distances, rows = gallery.search(queries, 10)
    assert distances.shape == rows.shape == (20, 10)  # k of the candidates the index gave
    np.testing.assert_allclose(distances, exact_distances(latents, queries, rows), rtol=1e-6)
    assert np.all(np.diff(distances, axis=1) >= 0)
    described = gallery.describe()
    assert described["recall_at_10"] == recorded and described["skipped"] == 0
    assert described["search"] == gallery.record["search"] and described["search"]["nprobe"] >= 1
    # the recall recorded is that of the loaded gallery's own searches, on the build's queries
    assert round(recall_at_10(latents, lambda q, k: gallery.search(q, k)[1]), 4) == recorded < 1
    # loaded without its index (the service's start-up check), it answers exact search
    distances, rows = load_gallery(dest, open_index=False).search(queries, 10)
    brute = np.linalg.norm(latents[None] - queries[:, None], axis=2)
    for q in range(len(queries)):
        assert set(rows[q]) == set(np.argsort(brute[q])[:10]), q
    np.testing.assert_allclose(distances, np.sort(brute, axis=1)[:, :10], rtol=1e-5)
    # an index of another number of rows than the latents
    short = tmp_path / "short"
    shutil.copytree(dest, short)
    record = json.loads((short / INDEX_FILE).read_text())
    entry = record["files"]["index"]
    faiss = load_faiss()
    smaller = faiss.IndexFlatL2(latents.shape[1])
    smaller.add(latents[:10])
    faiss.write_index(smaller, str(short / entry["path"]))
    entry.update(
        bytes=(short / entry["path"]).stat().st_size, sha256=sha256_file(short / entry["path"])
    )
    (short / INDEX_FILE).write_text(json.dumps(record))
    with pytest.raises(GalleryError) as caught:
        load_gallery(short)
    assert str(caught.value) == f"{short / entry['path']} holds 10 rows, not 3000"


def test_recall_at_10_sees_a_bad_search():
    rng = np.random.default_rng(2)
    latents = rng.normal(size=(500, 8)).astype(np.float32)
    perfect = recall_at_10(
        latents, lambda q, k: np.argsort(((latents[None] - q[:, None]) ** 2).sum(-1), 1)[:, :k]
    )
    random = recall_at_10(latents, lambda q, k: rng.integers(0, 500, (len(q), k)))
    assert perfect == 1.0 and random < 0.1


def test_ids_round_trip_and_are_found():
    names = ["b.png", "a/ü.png", "bad\udcff.png", "", "z" * 300]
    ids = Ids.build(names)
    assert [ids[i] for i in range(len(names))] == names
    assert [ids.find(n) for n in names] == list(range(len(names)))
    assert ids.find("c.png") is None
    numbers = Ids.build(np.array([5, 3, 9], np.int64))
    assert numbers.find("3") == 1 and numbers.find("03") is None and numbers.find("4") is None
    # integer ids, as an array or a list, are kept as numbers (no "03" for 3); text stays text
    for given in (np.array([5, 3, 9], np.uint32), [5, 3, 9], [np.int64(5), 3, 9]):
        ids = Ids.build(given)
        assert ids.numeric and [ids[i] for i in range(3)] == ["5", "3", "9"], given
    assert not Ids.build(["5", "3"]).numeric and Ids.build(["03"]).find("03") == 0


def test_aegan_similar_on_images_and_on_an_encode_output(
    collection, gallery_dir, encoded, image_bundle, tmp_path
):
    out = tmp_path / "similar.parquet"
    invoke(
        "similar", collection, "--gallery", gallery_dir, "--model", image_bundle, "--k", 3,
        "--out", out, "--device", "cpu", "--workers", 1,
    )  # fmt: skip
    table = pq.read_table(out).to_pydict()
    assert len(table["id"]) == PICTURES + 1
    for name, neighbours, distances, error in zip(
        table["id"], table["neighbours"], table["distances"], table["error"], strict=True
    ):
        if name == "broken.png":
            assert neighbours is None and "not a readable image" in error
            continue
        assert error is None and neighbours[0] == name and len(neighbours) == 3
        assert distances[0] == pytest.approx(0, abs=1e-4) and distances == sorted(distances)
    assert [p.name for p in tmp_path.iterdir()] == ["similar.parquet"]  # no temporary left
    again = tmp_path / "again.parquet"
    invoke("similar", encoded, "--gallery", gallery_dir, "--k", 3, "--out", again)
    assert pq.read_table(again).to_pydict() == table


def test_aegan_similar_refuses_queries_of_another_encoder(
    collection, gallery_dir, rgb_bundle, tmp_path
):
    output = refused(
        "similar", collection, "--gallery", gallery_dir, "--model", rgb_bundle,
        "--out", tmp_path / "x.parquet",
    )  # fmt: skip
    assert "was encoded by bundle" in output


def test_the_runtime_encodes_as_the_gallery_was(gallery_dir, collection, image_bundle):
    """The stored latents are the encoder's: one picture encoded here matches its row."""
    model = ModelRuntime(load_bundle(image_bundle), "cpu", 1)
    pixels = np.asarray(Image.open(collection / "group-1" / "004.png"), np.float32)
    z = model.encode((pixels / 127.5 - 1.0)[None, None])
    stored = load_gallery(gallery_dir).latent_of("group-1/004.png")
    assert stored.dtype == np.float32 and stored.shape == (32,)
    np.testing.assert_allclose(stored, z[0], atol=1e-5)


def test_aegan_similar_encodes_the_queries_on_ray(collection, gallery_dir, image_bundle, tmp_path):
    """``--ray``: the queries encoded by the ``aegan encode --ray`` job (a Ray started here, one
    actor) give the same table as the local run."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("the 'ray' extra is not installed (scripts/setup.sh installs it)")
    local, on_ray = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    common = ["--gallery", str(gallery_dir), "--model", str(image_bundle), "--k", "4"]
    invoke("similar", collection, *common, "--out", local, "--device", "cpu")
    result = run_aegan(
        ["similar", str(collection), *common, "--out", str(on_ray), "--ray", "--workers", "1"],
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{PICTURES + 1} queries, {PICTURES} searched, 1 errors" in result.stdout
    ours, theirs = pq.read_table(local).to_pydict(), pq.read_table(on_ray).to_pydict()
    assert ours["id"] == theirs["id"] and ours["neighbours"] == theirs["neighbours"]
    assert ours["error"] == theirs["error"]
    for a, b in zip(ours["distances"], theirs["distances"], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(a, b, atol=1e-4)
