"""Reproducible randomness: sampling seeds derived from where they are used, and the global RNG streams saved in a
checkpoint.

Rollouts draw from a seed derived from (run seed, step, micro-group, rank), not from the global stream, so what a
step samples does not depend on what ran before it (validation, a resume, another rank): a resumed run samples
bit for bit what the uninterrupted run sampled. The global streams (python, numpy, torch, CUDA) are still saved
and restored for anything else that draws from them.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part and on nothing else (stable across processes and Python runs)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def capture_rng_states() -> dict:
    """The global RNG states, as plain tensors and containers (loadable with `torch.load(weights_only=True)`)."""
    numpy_state = np.random.get_state()
    states = {
        "python": _python_state_to_tensor(random.getstate()),
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    random.setstate(_python_state_from_tensor(states["python"]))
    numpy_state = states["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _python_state_to_tensor(state: tuple) -> dict:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_state_from_tensor(state: dict) -> tuple:
    return state["version"], tuple(int(x) for x in state["internal"].tolist()), state["gauss"]
