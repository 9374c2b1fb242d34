"""Named random streams: every random draw of a run comes from a generator derived from its seed.

A stream is named by a key, e.g. ``("noise",)`` for the training noise or ``("probe", "gaps",
120)`` for the gap probe at epoch 120; its seed is the SeedSequence entropy of
``(seed, *key)`` with strings turned into numbers by CRC-32 (NumPy's SeedSequence mixes its
words so that nearby keys give independent streams). Hence

* training streams (``data`` order, training ``noise``, module ``init``) never see a draw made
  by a measurement, and measurements never see each other's;
* a measurement at epoch e of a model state is repeatable from the seed alone: nothing but the
  training streams needs to live in a checkpoint;
* an ensemble member draws from its own generators: its numbers do not depend on which other
  members it is trained with (``MemberRandom`` draws member by member and stacks).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["MemberRandom", "generator", "stream_seed"]


def _word(part: str | int) -> int:
    if isinstance(part, bool) or not isinstance(part, int | str | np.integer):
        raise TypeError(f"stream key parts must be str or int; got {part!r}")
    if isinstance(part, str):
        return zlib.crc32(part.encode())
    if part < 0:
        raise ValueError(f"stream key integers must be >= 0; got {part}")
    return int(part)


def stream_seed(seed: int, *key: str | int) -> int:
    """A 63-bit seed for the stream ``key`` of run seed ``seed`` (deterministic, independent)."""
    if isinstance(seed, bool) or int(seed) < 0:
        raise ValueError(f"seeds must be integers >= 0; got {seed!r}")
    words = [int(seed), *(_word(k) for k in key)]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def generator(seed: int, *key: str | int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` for the stream ``key`` of ``seed``."""
    return torch.Generator(device).manual_seed(stream_seed(seed, *key))


class MemberRandom:
    """One generator per ensemble member for one stream; draws are stacked on a member axis.

    ``randn(shape, member_dim)`` draws ``shape`` from each member's generator and stacks the
    draws at ``member_dim``. Members outside ``active`` draw nothing (their slice is zero), so a
    member's stream advances only with its own work. ``state()``/``set_state()`` expose the
    generators' states (a uint8 tensor per member) for checkpoints.
    """

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        if not generators:
            raise ValueError("MemberRandom needs at least one generator")
        self.generators = list(generators)

    @classmethod
    def from_seeds(cls, seeds: Sequence[int], *key: str | int,
                   device: torch.device | str = "cpu") -> MemberRandom:
        return cls([generator(s, *key, device=device) for s in seeds])

    def __len__(self) -> int:
        return len(self.generators)

    @property
    def device(self) -> torch.device:
        return self.generators[0].device

    def randn(self, shape: Sequence[int], member_dim: int = 0, *,
              active: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard-normal draws of ``shape`` per member, stacked at ``member_dim``."""
        if len(self.generators) == 1:
            if active is not None and not bool(active.reshape(-1)[0]):
                return torch.zeros(tuple(shape), device=self.device, dtype=dtype).unsqueeze(
                    member_dim)
            out = torch.randn(tuple(shape), generator=self.generators[0], device=self.device,
                              dtype=dtype)
            return out.unsqueeze(member_dim)
        keep = None if active is None else active.tolist()
        parts = []
        for k, g in enumerate(self.generators):  # one draw per member: its own stream
            if keep is None or keep[k]:
                parts.append(torch.randn(tuple(shape), generator=g, device=self.device,
                                         dtype=dtype))
            else:
                parts.append(torch.zeros(tuple(shape), device=self.device, dtype=dtype))
        return torch.stack(parts, member_dim)

    def rand(self, shape: Sequence[int], member_dim: int = 0, *,
             dtype: torch.dtype = torch.float32) -> Tensor:
        """Uniform [0, 1) draws of ``shape`` per member, stacked at ``member_dim``."""
        return torch.stack([torch.rand(tuple(shape), generator=g, device=self.device,
                                       dtype=dtype) for g in self.generators], member_dim)

    def randperm(self, n: int) -> Tensor:
        """A permutation of range(n) per member: [K, n] (int64, on the CPU)."""
        return torch.stack([torch.randperm(n, generator=g, device=self.device).cpu()
                            for g in self.generators])

    def state(self) -> list[Tensor]:
        return [g.get_state() for g in self.generators]

    def set_state(self, states: Sequence[Tensor]) -> None:
        if len(states) != len(self.generators):
            raise ValueError(f"{len(states)} generator states for {len(self)} members")
        for g, s in zip(self.generators, states, strict=True):
            g.set_state(s.cpu())

    def select(self, members: Sequence[int]) -> MemberRandom:
        """The generators of ``members`` (shared, not copied)."""
        return MemberRandom([self.generators[k] for k in members])
