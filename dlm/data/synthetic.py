"""Sources with a known entropy rate.

A first-order Markov chain over K symbols, started from its stationary distribution pi, with
transition rows ~ Dirichlet(c) (structure=dirichlet) or sparse and structured (structure=cycle):
each state's likely successor is the next one on a random cycle through all K states, `branches`
states also go to a second random state with probability U(0.1, 0.25), and a `noise` mass of every
row is spread uniformly (long confident runs between occasional branch points: the text-like
regime where parallel decoding pays). The exact entropy of a length-L sequence, per token, is
    H_L / L = (H(pi) + (L - 1) * H_rate) / L,   H_rate = sum_i pi_i H(P[i, :]).
"""

from __future__ import annotations


import numpy as np

from dlm.config import MarkovConfig, MarkovStructure


BRANCH_RANGE = (0.1, 0.25)  # structure=cycle: probability of a branching state's second successor


class MarkovChain:
    def __init__(self, transition: np.ndarray):
        self.P = np.asarray(transition, np.float64)
        self.K = self.P.shape[0]
        w, v = np.linalg.eig(self.P.T)
        pi = np.real(v[:, np.argmin(np.abs(w - 1.0))])
        self.pi = pi / pi.sum()
        self.cdf = np.cumsum(self.P, axis=1)
        self.pi_cdf = np.cumsum(self.pi)

    @classmethod
    def random(cls, cfg: MarkovConfig) -> "MarkovChain":
        rng = np.random.default_rng(cfg.seed)
        if cfg.structure == MarkovStructure.CYCLE:
            K = cfg.num_states
            order = rng.permutation(K)
            nxt = np.empty(K, np.int64)
            nxt[order] = np.roll(order, -1)
            P = np.full((K, K), cfg.noise / K)
            P[np.arange(K), nxt] += 1 - cfg.noise
            for i in rng.choice(K, cfg.branches, replace=False):
                other = rng.choice(np.setdiff1d(np.arange(K), [nxt[i]]))
                q = rng.uniform(*BRANCH_RANGE) * (1 - cfg.noise)
                P[i, nxt[i]] -= q
                P[i, other] += q
            return cls(P)
        P = rng.dirichlet(np.full(cfg.num_states, cfg.concentration), size=cfg.num_states)
        P = np.maximum(P, 1e-12)
        return cls(P / P.sum(1, keepdims=True))

    @staticmethod
    def _h(p):
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    @property
    def entropy_rate(self) -> float:
        return float(sum(self.pi[i] * self._h(self.P[i]) for i in range(self.K)))

    def entropy_per_token(self, length: int) -> float:
        """Exact entropy (nats/token) of a stationary length-`length` sequence."""
        return (self._h(self.pi) + (length - 1) * self.entropy_rate) / length

    def sample_uniforms(self, u: np.ndarray) -> np.ndarray:
        """Inverse-CDF sampling from uniforms u [N, L] -> states [N, L]."""
        N, L = u.shape
        x = np.empty((N, L), np.int32)
        x[:, 0] = np.minimum(np.searchsorted(self.pi_cdf, u[:, 0], side="right"), self.K - 1)
        for i in range(1, L):
            c = self.cdf[x[:, i - 1]]
            x[:, i] = np.minimum((u[:, i : i + 1] >= c).sum(1), self.K - 1)
        return x

    def sample_rows(self, seed: int, rows: np.ndarray, length: int) -> np.ndarray:
        """Row r is a function of (seed, r) alone, so any slicing of rows gives the same data."""
        u = np.stack([np.random.Generator(np.random.PCG64([seed, int(r)])).random(length) for r in rows])
        return self.sample_uniforms(u)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """Exact log-probability of each sequence x [N, L] (nats)."""
        x = np.asarray(x)
        lp = np.log(self.pi[x[:, 0]])
        return lp + np.log(self.P[x[:, :-1], x[:, 1:]]).sum(1)
