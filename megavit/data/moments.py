"""Mean and variance computed in pieces and combined exactly: the train-split statistics of the shards.

Chan, Golub & LeVeque (1979) pairwise update, stable where sums of squares are not (SQG
temperatures have a mean far larger than their spread). Combining in a fixed tree over a fixed
order makes the result independent of how many ranks computed the pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Moments:
    """Count, mean and M2 (sum of squared deviations) in float64, combinable in any grouping.

    delta = mean_b - mean_a, mean = mean_a + delta n_b / n, M2 = M2_a + M2_b + delta^2 n_a n_b / n.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray, axis: int | tuple[int, ...]) -> Moments:
        """Moments of `values` reduced over `axis` (two-pass, float64)."""
        values = np.asarray(values, dtype=np.float64)
        mean = values.mean(axis=axis, keepdims=True)
        m2 = np.square(values - mean).sum(axis=axis)
        return cls(count=values.size // m2.size, mean=mean.reshape(m2.shape), m2=m2)

    def combine(self, other: Moments) -> Moments:
        count = self.count + other.count
        delta = other.mean - self.mean
        return Moments(count=count, mean=self.mean + delta * (other.count / count),
                       m2=self.m2 + other.m2 + np.square(delta) * (self.count * other.count / count))

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof=0, as np.std)."""
        return np.sqrt(self.m2 / self.count)


def combine_all(parts: Sequence[Moments]) -> Moments:
    """Combine in a fixed binary tree over the given order: the result depends on the parts only."""
    if not parts:
        raise ValueError("combine_all needs at least one Moments")
    parts = list(parts)
    while len(parts) > 1:
        parts = [parts[i].combine(parts[i + 1]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]
