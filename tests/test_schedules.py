import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm.config import Schedule
from dlm.diffusion.schedules import NoiseSchedule

SCHEDULES = [NoiseSchedule(Schedule.LINEAR), NoiseSchedule(Schedule.COSINE), NoiseSchedule(Schedule.POLYNOMIAL, k=3.0),
             NoiseSchedule(Schedule.POLYNOMIAL, k=0.5), NoiseSchedule(Schedule.LOGLINEAR, eps=1e-3)]


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: f"{s.kind.value}-{s.k}")
def test_dalpha_matches_finite_differences(s):
    h = 1e-6
    with jax.enable_x64(True):
        t = jnp.linspace(0.02, 0.98, 49, dtype=jnp.float64)
        fd = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
        np.testing.assert_allclose(np.asarray(s.dalpha(t)), np.asarray(fd), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: f"{s.kind.value}-{s.k}")
def test_weight_is_minus_dalpha_over_one_minus_alpha(s):
    with jax.enable_x64(True):  # the reference formula cancels in 1 - alpha near t = 0
        t = jnp.linspace(0.01, 0.99, 99, dtype=jnp.float64)
        ref = np.asarray(-s.dalpha(t) / (1.0 - s.alpha(t)))
    w = np.asarray(s.weight(jnp.linspace(0.01, 0.99, 99, dtype=jnp.float32)))
    np.testing.assert_allclose(w, ref, rtol=1e-5)
    assert (w > 0).all()


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: f"{s.kind.value}-{s.k}")
def test_boundaries(s):
    assert float(s.alpha(jnp.float32(0.0))) == pytest.approx(1.0)
    assert float(s.alpha(jnp.float32(1.0))) == pytest.approx(0.0 if s.kind != Schedule.LOGLINEAR else s.eps, abs=1e-6)
    a = np.asarray(s.alpha(jnp.linspace(0, 1, 101)))
    assert (np.diff(a) <= 1e-7).all()  # alpha decreases
