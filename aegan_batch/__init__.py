"""Batch jobs over collections (``aegan encode``): the service's own upload decoding and ONNX
encoder over a folder of images, a list of paths or an ``.npy`` array, written as Parquet parts.

Framework-free: numpy, Pillow through :mod:`aegan_core.images` (``decode_upload`` and
``to_model_input``, the functions behind ``/encode``), ONNX Runtime through
:class:`~aegan_core.runtime.ModelRuntime`. pyarrow (extra ``batch``) and ray (extra ``ray``) are
imported inside the functions that need them.

The output DEST is a directory (a name ending in ``.parquet`` is a directory too, as Spark and Ray
write them; ``pyarrow.parquet.read_table(DEST)`` and ``pandas.read_parquet(DEST)`` read it as one
table):

- ``part-00000.parquet``, ``part-00001.parquet``, ...: one per fixed-size chunk of the sorted
  inputs, columns ``id`` (path relative to SOURCE, as listed, or the row index of an ``.npy``;
  bytes of a file name that are not UTF-8 written as ``\\xNN``), ``latent``
  (``fixed_size_list<float32>[latent_dim]``, null where the input failed) and ``error`` (null, or
  why the input could not be encoded). Each part is written under a hidden temporary name and
  renamed into place; a restart also checks each part's row count and rewrites one that is short.
- ``_job.json``: the source, the model (name and SHA-256 of its encoder), the chunk size and the
  inputs: their names, and each one's size and modification time (for an ``.npy``: the file's
  size, modification time, shape and dtype). A second run on the same DEST skips the parts that
  exist; one with another source, model or chunk size, or on inputs that changed since, is
  refused instead of mixing two jobs, or old and new files, in one table.
- ``_job.lock``: locked by the run writing DEST; a second run on the same DEST is refused while
  the first one runs.

Readers of the table ignore files whose names start with ``_`` or ``.``.

The package, one module per seam: :mod:`.inputs` (what SOURCE holds, reading an input as the
service reads an upload, encoding a batch), :mod:`.job` (the plan checked against DEST, its record
and lock, the parts and the one chunk -> batches -> encode -> part path both executors share),
:mod:`.local` (threads or processes on this machine) and :mod:`.on_ray` (Ray Data across a
cluster).
"""

from .inputs import (
    IMAGE_SUFFIXES,
    ArrayReader,
    FileReader,
    Inputs,
    JobError,
    list_inputs,
    printable,
)
from .job import JOB_FILE, LOCK_FILE, PART_NAME, JobPlan, JobSummary, plan_job
from .local import default_workers, run_job
from .on_ray import run_job_on_ray

__all__ = [
    "IMAGE_SUFFIXES",
    "JOB_FILE",
    "LOCK_FILE",
    "PART_NAME",
    "ArrayReader",
    "FileReader",
    "Inputs",
    "JobError",
    "JobPlan",
    "JobSummary",
    "default_workers",
    "list_inputs",
    "plan_job",
    "printable",
    "run_job",
    "run_job_on_ray",
]
