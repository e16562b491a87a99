"""The demo corpus and its batches: bytes of text, the same batches for every optimizer.

By default the corpus is the Python standard library's own source (the top-level
``*.py`` files of ``sysconfig.get_paths()["stdlib"]``, ~4.7 MB on CPython 3.11): every
machine that runs Python has it, so the demo downloads nothing. ``load_corpus(path)``
reads any text file instead.

The split is per file and keyed by file name (crc32 of the name, 1 in 10 to
validation), so it is deterministic and does not reshuffle when a Python release adds a
module. A user file is split by position: its last 10% is validation.

Batches are a pure function of (seed, step, rank): global batch ``step`` is
``world_size`` micro-batches, and rank r takes micro-batch ``step * world_size + r``
(what Accelerate's sharded DataLoader hands rank r too). Runs with different
optimizers therefore see exactly the same tokens in the same order.
"""

from __future__ import annotations

import glob
import os
import sysconfig
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

VALIDATION_EVERY = 10  # 1 in 10 files (or the last 10% of a user file) is validation


@dataclass
class Corpus:
    train: Tensor  # uint8 bytes
    val: Tensor
    source: str    # where the text came from, for the report

    def describe(self) -> str:
        return f"{self.source}: {self.train.numel():,} train bytes, {self.val.numel():,} validation bytes"


def stdlib_files() -> list[str]:
    """Return the standard library's top-level ``.py`` files, sorted by name."""
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


def _is_validation(name: str) -> bool:
    return zlib.crc32(name.encode()) % VALIDATION_EVERY == 0


def _as_bytes(chunks: list[bytes]) -> Tensor:
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def load_corpus(path: str | None = None) -> Corpus:
    """Load ``path`` (any text file) or, when None, the standard library's source."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data {path!r}: no such file; pass a text file to train on")
        with open(path, "rb") as f:
            text = f.read()
        cut = len(text) - len(text) // VALIDATION_EVERY
        return Corpus(_as_bytes([text[:cut]]), _as_bytes([text[cut:]]), os.path.basename(path))
    files = stdlib_files()
    if not files:
        raise FileNotFoundError(f"no .py files under {sysconfig.get_paths()['stdlib']!r}; pass --data FILE")
    train, val = [], []
    for name in files:
        with open(name, "rb") as f:
            (val if _is_validation(os.path.basename(name)) else train).append(f.read())
    return Corpus(_as_bytes(train), _as_bytes(val), f"Python {sysconfig.get_python_version()} stdlib source")


def _windows(data: Tensor, starts: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Return (inputs, targets) int64 [B, block_size] of the windows starting at ``starts``."""
    index = starts.unsqueeze(1) + torch.arange(block_size + 1)
    chunk = data[index].long()
    return chunk[:, :-1], chunk[:, 1:]


def check_fits(data: Tensor, block_size: int, what: str) -> None:
    if data.numel() < block_size + 2:
        raise ValueError(f"the {what} text has {data.numel()} bytes, fewer than block_size + 2 = "
                         f"{block_size + 2}; use a longer --data file or a smaller --block_size")


def micro_batch_starts(corpus: Corpus, index: int, *, batch_size: int, block_size: int, seed: int) -> Tensor:
    """Return the start offsets of micro-batch ``index`` (global step * world_size + rank)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randint(0, corpus.train.numel() - block_size - 1, (batch_size,), generator=generator)


def train_batch(corpus: Corpus, *, step: int, rank: int, world_size: int, batch_size: int, block_size: int,
                seed: int) -> tuple[Tensor, Tensor]:
    """Return rank ``rank``'s micro-batch of global step ``step``: random windows of the train text."""
    starts = micro_batch_starts(corpus, step * world_size + rank, batch_size=batch_size, block_size=block_size,
                                seed=seed)
    return _windows(corpus.train, starts, block_size)


class TrainWindows(torch.utils.data.Dataset):
    """The same windows as ``train_batch``, one per item, for a DataLoader that shards batches.

    Item i is row i % batch_size of micro-batch i // batch_size. A DataLoader with
    ``batch_size`` over it, sharded round-robin across N processes (Accelerate's
    default), gives rank r exactly ``train_batch(step=s, rank=r)`` at step s.
    """

    def __init__(self, corpus: Corpus, *, steps: int, world_size: int, batch_size: int, block_size: int,
                 seed: int):
        self.corpus, self.batch_size, self.block_size, self.seed = corpus, batch_size, block_size, seed
        self.length = steps * world_size * batch_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        starts = micro_batch_starts(self.corpus, i // self.batch_size, batch_size=self.batch_size,
                                    block_size=self.block_size, seed=self.seed)
        x, y = _windows(self.corpus.train, starts[i % self.batch_size:][:1], self.block_size)
        return x[0], y[0]


def validation_batches(corpus: Corpus, *, num_sequences: int, rank: int, world_size: int, batch_size: int,
                       block_size: int):
    """Yield this rank's share of ``num_sequences`` windows spread evenly over the validation text.

    The windows do not depend on the seed or the optimizer, so every run is scored on the
    same text; rank r takes every world_size-th window.
    """
    span = corpus.val.numel() - block_size - 1
    starts = torch.linspace(0, span, num_sequences).long()[rank::world_size]
    for lo in range(0, starts.numel(), batch_size):
        yield _windows(corpus.val, starts[lo:lo + batch_size], block_size)
