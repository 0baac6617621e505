"""A run's random streams: seeding Python, NumPy and torch from one seed, the run's own
generators, and every random state as checkpointable values."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (every device) from `seed`; return a CPU generator seeded with it.

    Call it before building the model so the initial weights are reproducible too.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass
class Generators:
    """A run's random streams, all derived from the one seed and saved in every checkpoint."""

    shuffle: torch.Generator  # CPU: per-epoch permutations
    augment: torch.Generator  # on the training device: crop offsets and flips

    @classmethod
    def seeded(cls, seed: int, device: torch.device) -> "Generators":
        """`seed_everything(seed)`, then the two streams at fixed offsets from `seed`."""
        return cls(shuffle=seed_everything(seed), augment=torch.Generator(device).manual_seed(seed + 1))


def rng_state(generators: Generators) -> dict[str, Any]:
    """Every random state of the run as tensors and plain Python values (weights_only-loadable)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "shuffle": generators.shuffle.get_state(),
        "augment": generators.augment.get_state(),
        "augment_device": generators.augment.device.type,
    }


def restore_rng_state(state: dict[str, Any], generators: Generators) -> None:
    """Inverse of `rng_state`. Keys it does not know (older checkpoints' "workers") are ignored."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generators.shuffle.set_state(state["shuffle"])
    generators.augment.set_state(state["augment"])
