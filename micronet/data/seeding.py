"""Seeded torch.Generator objects derived from (seed, purpose, ...) tuples.

Every random choice in the data pipeline draws from a fresh generator keyed by what it is for, never from global
RNG state, so a resumed run reproduces exactly the batches it would have seen without the interruption.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that depends only on ``parts`` (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def generator_for(*parts: object) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))
