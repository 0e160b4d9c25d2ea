"""A seeded permutation of ``0 … n-1`` evaluated one position at a time.

The sharder needs "which input goes at slot s" for any s, for any n, on any machine,
without holding the whole permutation (8 bytes per input: 800 MB for 100 M images).
A balanced Feistel network over k bits (2^k ≥ n, k even) is a bijection on
``0 … 2^k-1`` for any round function; walking the cycle (applying it again while the
value is ≥ n) restricts it to ``0 … n-1`` and stays a bijection. Since 2^k < 4n, a
walk takes under four steps on average. Six rounds of a splitmix64-mixed round
function give an order with no visible structure (Luby–Rackoff: four already make a
pseudo-random permutation). Everything is vectorised over numpy uint64 arrays, whose
arithmetic wraps, so a million positions take well under a second.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit flips each output bit with p ≈ ½."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class SeededPermutation:
    """π: ``0 … n-1`` → ``0 … n-1``, a bijection fixed by ``(n, seed)``; ``π(positions)``."""

    def __init__(self, n: int, seed: int) -> None:
        if n < 0 or seed < 0:
            raise ValueError(f"n and seed must be ≥ 0, got n={n}, seed={seed}")
        self.n = n
        bits = max(2, (max(n, 2) - 1).bit_length())
        self._half = (bits + 1) // 2
        self._mask = np.uint64((1 << self._half) - 1)
        base = np.arange(1, ROUNDS + 1, dtype=np.uint64) * _GOLDEN
        self._keys = _mix(base ^ _mix(np.array([seed], dtype=np.uint64)))

    def __call__(self, positions: np.ndarray | range) -> np.ndarray:
        """The images of ``positions`` (each in ``0 … n-1``) as int64, in the same order."""
        x = np.asarray(positions, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"positions must lie in 0 … {self.n - 1}")
        y = self._encrypt(x.astype(np.uint64))
        outside = np.flatnonzero(y >= np.uint64(self.n))
        while outside.size:  # cycle walking: at most a few rounds for any element
            y[outside] = self._encrypt(y[outside])
            outside = outside[y[outside] >= np.uint64(self.n)]
        return y.astype(np.int64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self._half)
        left, right = x >> shift, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix(right ^ key) & self._mask)
        return (left << shift) | right
