"""Readers for ``aegan_batch.run_job(reader=...)`` that misbehave on purpose. They
live in a module of their own so that spawned worker processes can import them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from aegan_batch import FileReader


@dataclass(frozen=True)
class DyingReader(FileReader):
    """Reads files as ``aegan encode`` does, but the process reading ``fatal`` dies on the spot,
    as one killed by a crash in a codec or by the kernel's out-of-memory killer would."""

    fatal: str = ""

    def read(self, label: str, location: str) -> np.ndarray:
        if label == self.fatal:
            os._exit(70)
        return super().read(label, location)
