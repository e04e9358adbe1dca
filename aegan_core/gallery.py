"""Galleries: the latents of an ``aegan encode`` output, indexed for nearest-neighbour search.

``aegan index DEST --model BUNDLE`` (:mod:`aegan_batch.index`) writes the gallery beside
the Parquet parts of DEST; the service (``AEGAN_GALLERY=DEST``, ``POST /similar``) and ``aegan
similar`` load it with :func:`load_gallery`. Files, all in DEST and ignored by Parquet readers
(their names start with ``_``):

- ``_index.json``: what the gallery is (:data:`INDEX_VERSION`): its kind (``exact`` or
  ``faiss-ivf``), size, latent dimension, the bundle it was encoded by (name, SHA-256 of its
  manifest and of its encoder), the ``aegan encode`` job it was read from, the search parameter
  and the recall@10 measured against exact search (approximate kind), and the name, size and
  SHA-256 of each data file below;
- ``_index-TAG.latents.npy``: (N, latent_dim) float32, one row per input that was encoded (rows
  with an error are left out), in the job's order; memory-mapped when loaded;
- ``_index-TAG.ids.npy`` (int64, an ``.npy`` source) or ``_index-TAG.ids.npy`` (uint8, the ids'
  UTF-8 bytes end to end) with ``_index-TAG.offsets.npy`` (int64, N + 1 offsets): the ids;
- ``_index-TAG.order.npy``: the rows sorted by id, to find an id by bisection;
- ``_index-TAG.faiss``: the approximate index (faiss-cpu, an inverted file of the latents
  clustered by k-means), when the kind is ``faiss-ivf``.

TAG is new for every build, and ``_index.json`` is replaced last, atomically: a reader sees the
old gallery or the new one, whole. Searches answer Euclidean (L2) distances between latents, exact
for the returned neighbours (an approximate index only proposes the candidates).

Framework-free: numpy, and faiss (imported only for an approximate index).
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import ENCODER, MANIFEST_NAME, Bundle, sha256_file
from .errors import ClientError, RequestError, UserError

INDEX_FILE = "_index.json"
INDEX_VERSION = 1
EXACT = "exact"
APPROXIMATE = "faiss-ivf"
KINDS = (EXACT, APPROXIMATE)
MAX_K = 100  # neighbours per query, at most


class GalleryError(UserError):
    """A gallery that cannot be used as asked (missing, incomplete, another bundle's); the message
    says why and what to run."""


class GalleryNotFound(ClientError):
    """404: no gallery is configured, it holds no latents, or an id is not in it."""

    error_code = HTTPStatus.NOT_FOUND


def bundle_identity(bundle: Bundle) -> dict[str, str]:
    """What ties a gallery to a bundle: its name and the SHA-256 of its manifest (which holds the
    hashes of every graph) and of its encoder."""
    return {
        "name": bundle.name,
        "manifest_sha256": sha256_file(bundle.path / MANIFEST_NAME),
        "encoder_sha256": bundle.sha256(ENCODER),
    }


# --- ids ----------------------------------------------------------------------------------------


class Ids:
    """The gallery's ids by row, and rows by id (bisection over the rows sorted by id), held as
    arrays: a million ids cost their bytes, not a million Python strings."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray | None, order: np.ndarray) -> None:
        self.values = values  # int64 ids, or the UTF-8 bytes of every id end to end
        self.offsets = offsets  # None for int ids
        self.order = order  # rows sorted by id

    @classmethod
    def build(cls, ids: Sequence[str] | Sequence[int] | np.ndarray) -> Ids:
        if (
            isinstance(ids, np.ndarray)
            and ids.dtype.kind in "iu"
            or (len(ids) and all(isinstance(i, int | np.integer) for i in ids))
        ):
            numbers = np.asarray(ids, np.int64)
            return cls(numbers, None, np.argsort(numbers, kind="stable").astype(np.int64))
        encoded = [str(i).encode("utf-8", "surrogatepass") for i in ids]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        values = np.frombuffer(b"".join(encoded), np.uint8).copy()
        order = np.array(sorted(range(len(encoded)), key=encoded.__getitem__), np.int64)
        return cls(values, offsets, order)

    @property
    def numeric(self) -> bool:
        return self.offsets is None

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, row: int) -> str:
        if self.offsets is None:
            return str(int(self.values[row]))
        start, stop = int(self.offsets[row]), int(self.offsets[row + 1])
        return self.values[start:stop].tobytes().decode("utf-8", "surrogatepass")

    def _key(self, row: int) -> int | bytes:
        if self.offsets is None:
            return int(self.values[row])
        return self.values[int(self.offsets[row]) : int(self.offsets[row + 1])].tobytes()

    def find(self, id: str) -> int | None:
        """The row of ``id``, or None."""
        if self.offsets is None:
            try:
                key: int | bytes = int(id)
            except ValueError:
                return None
            if str(key) != id:
                return None
        else:
            key = id.encode("utf-8", "surrogatepass")
        keys = _Keys(self)
        at = bisect.bisect_left(keys, key)
        if at < len(self) and keys[at] == key:
            return int(self.order[at])
        return None


class _Keys:
    """The ids in sorted order, as a sequence bisect can search without building a list."""

    def __init__(self, ids: Ids) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, at: int) -> int | bytes:
        return self.ids._key(int(self.ids.order[at]))


# --- search -------------------------------------------------------------------------------------


def exact_search(
    latents: np.ndarray, norms: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``latents`` to each query: (rows (Q, k), squared distances, not
    yet exact). ``norms`` are the squared norms of the rows."""
    k = min(k, len(latents))
    scores = norms[None, :] - 2.0 * (queries @ latents.T)  # (Q, N): |x|^2 - 2 x.q
    if k < latents.shape[0]:
        rows = np.argpartition(scores, k - 1, axis=1)[:, :k]
    else:
        rows = np.broadcast_to(np.arange(latents.shape[0]), (len(queries), k)).copy()
    return rows.astype(np.int64), np.take_along_axis(scores, rows, axis=1)


def exact_distances(latents: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Euclidean distances (Q, k) from each query to its candidate rows (-1: none)."""
    found = np.where(rows >= 0, rows, 0)
    diff = np.asarray(latents[found.reshape(-1)], np.float32).reshape(*rows.shape, -1)
    distances = np.sqrt(((diff - queries[:, None, :]) ** 2).sum(-1, dtype=np.float64))
    return np.where(rows >= 0, distances, np.inf)


def nearest_first(
    latents: np.ndarray, queries: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates (Q, k) ranked by exact distance, ties by row: (distances (Q, k), rows (Q, k))."""
    distances = exact_distances(latents, queries, rows)
    order = np.lexsort((rows, distances), axis=1)
    return np.take_along_axis(distances, order, 1), np.take_along_axis(rows, order, 1)


def load_faiss() -> Any:
    """faiss, with a message naming the package when it is missing."""
    try:
        import faiss
    except ModuleNotFoundError as exc:
        raise GalleryError(
            "this gallery's index needs faiss-cpu, which is not installed (pip install faiss-cpu)"
        ) from exc
    return faiss


@dataclass
class Gallery:
    """A loaded gallery: its record (``_index.json``), latents, ids and index."""

    path: Path
    record: dict[str, Any]
    latents: np.ndarray  # (N, latent_dim) float32, memory-mapped
    ids: Ids
    index: Any = None  # the faiss index of an approximate gallery
    norms: np.ndarray | None = None  # squared norms of the rows (exact search)

    @property
    def size(self) -> int:
        return int(self.latents.shape[0])

    @property
    def kind(self) -> str:
        return str(self.record["kind"])

    @property
    def latent_dim(self) -> int:
        return int(self.record["latent_dim"])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``min(k, size)`` nearest gallery rows to each query (Q, latent_dim), nearest
        first: (distances (Q, k) Euclidean, rows (Q, k)). Raises :class:`GalleryNotFound` when
        the gallery is empty and :class:`RequestError` for a bad ``k`` or bad queries."""
        queries = self.check_queries(queries)
        if not 1 <= k <= MAX_K:
            raise RequestError(f"k = {k}: ask for 1 to {MAX_K} neighbours")
        if self.size == 0:
            raise GalleryNotFound(
                f"the gallery {self.path} holds no latents (every one of its "
                f"{self.record.get('skipped', 0)} inputs failed to encode); nothing to search"
            )
        k = min(k, self.size)
        if self.index is None:
            norms = self.norms if self.norms is not None else _norms(self.latents)
            block = max(1, (1 << 23) // self.size)  # queries per pass: (block, N) scores
            rows = np.concatenate(
                [
                    exact_search(self.latents, norms, queries[i : i + block], k)[0]
                    for i in range(0, len(queries), block)
                ]
            )
        else:
            # per call, not set on the shared index (searches run concurrently)
            params = load_faiss().SearchParametersIVF(nprobe=int(self.record["search"]["nprobe"]))
            _, rows = self.index.search(queries, k, params=params)
        return nearest_first(self.latents, queries, rows.astype(np.int64))

    def check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.latent_dim:
            raise RequestError(
                f"queries of shape {list(queries.shape)}; this gallery's latents have "
                f"{self.latent_dim} values"
            )
        if not np.all(np.isfinite(queries)):
            raise RequestError("a query latent holds NaN or infinite values")
        return np.ascontiguousarray(queries)

    def latent_of(self, id: str) -> np.ndarray:
        """The stored latent of ``id``, float32 as :func:`load_gallery` checked (404 when the
        gallery has no such id)."""
        return np.asarray(self.latents[self.row_of(id)])

    def row_of(self, id: str) -> int:
        row = self.ids.find(id)
        if row is None:
            shown = id if len(id) <= 200 else id[:200] + "..."
            raise GalleryNotFound(f"id {shown!r} is not in the gallery")
        return row

    def describe(self) -> dict[str, Any]:
        """For ``/info`` and the CLI: what the gallery is."""
        return {
            "path": str(self.path),
            "size": self.size,
            "kind": self.kind,
            "latent_dim": self.latent_dim,
            "bundle": self.record["bundle"],
            "recall_at_10": self.record.get("recall_at_10"),
            "search": self.record.get("search"),
            "skipped": self.record.get("skipped", 0),
        }


def _norms(latents: np.ndarray) -> np.ndarray:
    norms: np.ndarray = np.einsum("ij,ij->i", latents, latents, dtype=np.float32)
    return norms


def load_gallery(
    dest: str | os.PathLike[str],
    bundle: Bundle | None = None,
    verify: bool = True,
    threads: int = 1,
    open_index: bool = True,
) -> Gallery:
    """Load the gallery written by ``aegan index`` in DEST. With ``bundle``, refuse a gallery
    encoded by another bundle (naming both); with ``verify``, check every file's SHA-256 (else
    only its size). ``threads``: faiss's threads for a batch of queries. ``open_index=False``
    checks the files without reading the approximate index. Raises :class:`GalleryError` with the
    reason and what to run."""
    root = Path(dest)
    record_path = root / INDEX_FILE
    if not root.is_dir():
        raise GalleryError(f"gallery {root} is not a directory (an `aegan encode` output)")
    if not record_path.is_file():
        raise GalleryError(
            f"gallery {root} has no {INDEX_FILE}: build it with `aegan index {root} --model BUNDLE`"
        )
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GalleryError(
            f"{record_path} is not readable ({exc}); run `aegan index` again"
        ) from None
    if not isinstance(record, dict) or record.get("format_version") != INDEX_VERSION:
        version = record.get("format_version") if isinstance(record, dict) else None
        raise GalleryError(
            f"{record_path} has format_version {version!r}; this version reads "
            f"{INDEX_VERSION}: run `aegan index {root} --model BUNDLE` again"
        )
    if record.get("kind") not in KINDS:
        raise GalleryError(f"{record_path}: unknown index kind {record.get('kind')!r}")
    if bundle is not None:
        check_bundle(record, bundle, root)
    files = {role: _checked(root, entry, verify) for role, entry in record["files"].items()}
    latents = np.load(files["latents"], mmap_mode="r", allow_pickle=False)
    if (
        latents.dtype != np.float32
        or latents.ndim != 2
        or latents.shape[1:] != (record["latent_dim"],)
    ):
        raise GalleryError(f"{files['latents']}: not ({record['size']}, latent_dim) float32")
    if latents.shape[0] != record["size"]:
        raise GalleryError(
            f"{files['latents']} holds {latents.shape[0]} rows, not {record['size']}"
        )
    offsets = np.load(files["offsets"], allow_pickle=False) if "offsets" in files else None
    ids = Ids(
        np.load(files["ids"], allow_pickle=False),
        offsets,
        np.load(files["order"], allow_pickle=False),
    )
    if len(ids) != len(latents) or (offsets is not None and len(offsets) != len(latents) + 1):
        raise GalleryError(f"gallery {root}: ids and latents differ in number; rebuild it")
    gallery = Gallery(root, record, latents, ids)
    if record["kind"] == APPROXIMATE and open_index:
        faiss = load_faiss()
        faiss.omp_set_num_threads(threads)
        gallery.index = faiss.read_index(str(files["index"]))
        if gallery.index.ntotal != len(latents):
            raise GalleryError(
                f"{files['index']} holds {gallery.index.ntotal} rows, not {len(latents)}"
            )
    elif record["kind"] == EXACT:
        gallery.norms = _norms(np.asarray(latents))
    return gallery


def check_bundle(record: dict[str, Any], bundle: Bundle, root: Path) -> None:
    """Refuse a gallery encoded by another bundle than ``bundle``, naming both."""
    ours = bundle_identity(bundle)
    theirs = record.get("bundle", {})
    if theirs.get("manifest_sha256") != ours["manifest_sha256"]:
        raise GalleryError(
            f"gallery {root} was encoded by bundle {theirs.get('name')!r} (manifest sha256 "
            f"{str(theirs.get('manifest_sha256'))[:12]}...), not by {bundle.name!r} at "
            f"{bundle.path} (manifest sha256 {ours['manifest_sha256'][:12]}...): its latents "
            "cannot be compared; serve the bundle it was encoded by, or encode and index the "
            "collection again with this one"
        )


def _checked(root: Path, entry: dict[str, Any], verify: bool) -> Path:
    name = str(entry["path"])
    path = root / name
    if Path(name).name != name or not path.is_file():
        raise GalleryError(f"gallery {root}: {entry['path']} is missing; run `aegan index` again")
    if path.stat().st_size != entry["bytes"] or (verify and sha256_file(path) != entry["sha256"]):
        raise GalleryError(
            f"gallery {root}: {entry['path']} does not match {INDEX_FILE} (size or sha256): "
            "it was altered or truncated; run `aegan index` again"
        )
    return path
