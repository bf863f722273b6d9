"""Brute-force references on tiny vocabularies: a distribution p over V^L and its exact denoiser."""

import itertools

import jax.numpy as jnp
import numpy as np


class ExactDenoiser:
    """p over all V^L sequences; logits(x_t)[i] = log p(x0^i = . | visible tokens of x_t)."""

    def __init__(self, V: int, L: int, seed: int = 0, concentration: float = 0.7):
        self.V, self.L, self.mask = V, L, V
        self.seqs = np.array(list(itertools.product(range(V), repeat=L)), np.int32)  # [V^L, L]
        rng = np.random.default_rng(seed)
        self.p = rng.dirichlet(np.full(len(self.seqs), concentration))
        self.p = np.maximum(self.p, 1e-6)
        self.p /= self.p.sum()
        # Table over all (V+1)^L corrupted inputs.
        self.inputs = np.array(list(itertools.product(range(V + 1), repeat=L)), np.int32)
        table = np.zeros((len(self.inputs), L, V))
        for n, xt in enumerate(self.inputs):
            vis = xt != self.mask
            ok = (self.seqs[:, vis] == xt[vis]).all(1)
            post = self.p * ok
            post = post / post.sum()
            for i in range(L):
                table[n, i] = np.bincount(self.seqs[:, i], weights=post, minlength=V)
        self.table = np.log(np.maximum(table, 1e-30)).astype(np.float32)
        self.table_j = jnp.asarray(self.table)
        self.radix = (V + 1) ** np.arange(L - 1, -1, -1)

    def logits(self, xt):
        """Traceable: xt [B, L] -> logits [B, L, V]."""
        idx = (jnp.asarray(xt) * jnp.asarray(self.radix)).sum(-1)
        return self.table_j[idx]

    def entropy(self) -> float:
        return float(-(self.p * np.log(self.p)).sum())

    def log_prob(self, x) -> float:
        return float(np.log(self.p[(self.seqs == np.asarray(x)).all(1)][0]))
