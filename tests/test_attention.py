"""The chunked (online-softmax) attention against the whole-matrix reference, for every mask dlm
builds, forward and backward; structural specs against the dense masks they replace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm.diffusion import hyperschedules as hs
from dlm.models import attention as A

B, L, H, D = 2, 45, 2, 8


def _qkv(Lq=L, Lk=L, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return jax.random.normal(kq, (B, Lq, H, D)), jax.random.normal(kk, (B, Lk, H, D)), jax.random.normal(kv, (B, Lk, H, D))


def _specs():
    k = jax.random.split(jax.random.key(1), 4)
    role = jax.random.randint(k[0], (B, L), 0, 3)
    kept = jax.random.uniform(k[1], (B, L)) < 0.4
    left_pad = jnp.arange(L)[None] >= jnp.array([[0], [7]])  # row 1: 7 padding positions on the left
    return {
        "full": A.FULL,
        "causal": A.CAUSAL,
        "block_causal": A.block_causal(4),
        "hyperschedule_roles": hs.attention_spec(role, 5),
        "dpad_kept": A.visible_keys(kept),
        "padding": A.visible_keys(left_pad),
        "no_visible_key": A.visible_keys(jnp.zeros((B, L), bool).at[0].set(True)),
    }


@pytest.mark.parametrize("name", list(_specs()))
def test_chunked_attention_equals_reference_forward_and_backward(name):
    spec = _specs()[name]
    q, k, v = _qkv()
    ref = A.einsum_attention(q, k, v, spec.mask(L, L))
    out = A.chunked_attention(q, k, v, spec, 8, 16)  # 45 is no multiple of either tile
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    cot = jax.random.normal(jax.random.key(9), ref.shape)
    loss = lambda impl: lambda q, k, v: (A.attention(q, k, v, spec, impl, 8) * cot).sum()
    for g_ref, g in zip(jax.grad(loss("einsum"), (0, 1, 2))(q, k, v), jax.grad(loss("chunked"), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=0)


def test_chunked_attention_with_a_kv_cache_aligns_queries_to_the_end_of_the_keys():
    q, k, v = _qkv(Lq=12, Lk=L)
    causal = jnp.tril(jnp.ones((12, L), bool), L - 12)[None, None]
    ref = A.einsum_attention(q, k, v, causal)
    np.testing.assert_allclose(A.chunked_attention(q, k, v, A.CAUSAL, 5, 7), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(A.CAUSAL.mask(12, L), causal)


def test_hyperschedule_spec_equals_the_dense_role_mask():
    role = jax.random.randint(jax.random.key(3), (3, 24), 0, 3)
    np.testing.assert_array_equal(hs.attention_spec(role, 4).mask(24, 24)[:, 0], hs.attention_mask(role, 4))
    np.testing.assert_array_equal(hs.double_layout_spec(12, 3).mask(24, 24)[0, 0], hs.double_layout_mask(12, 3))


def test_double_layout_attention_chunked_equals_reference():
    spec = hs.double_layout_spec(20, 4)
    q, k, v = _qkv(40, 40)
    ref = A.einsum_attention(q, k, v, hs.double_layout_mask(20, 4)[None, None])
    np.testing.assert_allclose(A.chunked_attention(q, k, v, spec, 16, 16), ref, atol=1e-5, rtol=0)


def test_bf16_chunked_attention_accumulates_in_float32():
    """bf16 inputs: the chunked result is as close to the float32 result as the einsum one (both
    take scores and softmax in float32)."""
    q, k, v = _qkv()
    spec = _specs()["hyperschedule_roles"]
    exact = A.einsum_attention(q, k, v, spec.mask(L, L))
    lo = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    err_ref = float(jnp.abs(A.einsum_attention(*lo, spec.mask(L, L)).astype(jnp.float32) - exact).max())
    err = float(jnp.abs(A.chunked_attention(*lo, spec, 8, 8).astype(jnp.float32) - exact).max())
    assert err < 2e-2 and err <= 2 * err_ref, (err, err_ref)


def _decode(root, impl, *over):
    import dlm
    from dlm.config import load_config

    cfg = load_config(root / "configs/test.yaml", [f"model.attention={impl}", "model.attention_chunk=8", *over])
    model = dlm.build_model(cfg)
    out = dlm.generate(model, list(range(3, 9)), cfg.sampling, diffusion=cfg.diffusion, num_samples=2, length=32)
    return out["tokens"]


@pytest.mark.parametrize("over", [
    ("sampling.sampler=parallel", "sampling.decode.cache=prefix", "sampling.decode.suffix_dropout=true",
     "sampling.decode.window=12", "sampling.decode.block_length=8", "sampling.decode.credit=true"),
    ("sampling.sampler=parallel", "sampling.decode.cache=dual", "sampling.decode.block_length=8"),
    ("diffusion.hyperschedule=block", "diffusion.block_width=8", "sampling.steps=4"),
])
def test_decoders_give_the_same_tokens_with_chunked_attention(root, over):
    """Every structural mask of the decoders (DPad kept sets, prefix / dual caches, the block
    hyperschedule's commit and window rules) through tiles of 8: the same greedy tokens."""
    over = ("sampling.temperature=0", *over)
    np.testing.assert_array_equal(_decode(root, "chunked", *over), _decode(root, "einsum", *over))


def test_splash_kernel_in_pallas_interpret_mode_equals_reference():
    """The TPU splash kernel, run by the Pallas interpreter on CPU, for the masks it takes: full,
    causal and key visibility (as segment ids)."""
    q, k, v = (jax.random.normal(key, (B, 256, H, 128)) for key in jax.random.split(jax.random.key(4), 3))  # head_dim 128: the lane width
    for spec in (A.FULL, A.CAUSAL, A.visible_keys(jnp.arange(256)[None] < jnp.array([[200], [131]]))):
        ref = A.einsum_attention(q, k, v, spec.mask(256, 256))
        np.testing.assert_allclose(A.splash_attention(q, k, v, spec, interpret=True), ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="model.attention=chunked"):
        A.splash_attention(q, k, v, A.block_causal(4), interpret=True)


@pytest.mark.parametrize("name", list(_specs()))
def test_xla_attention_equals_reference_forward_and_backward(name):
    """jax.nn.dot_product_attention with the rule's mask, rows without a visible key included
    (0, as the reference gives)."""
    spec = _specs()[name]
    q, k, v = _qkv()
    ref = A.einsum_attention(q, k, v, spec.mask(L, L))
    np.testing.assert_allclose(A.attention(q, k, v, spec, "xla"), ref, atol=1e-5, rtol=0)
    cot = jax.random.normal(jax.random.key(9), ref.shape)
    loss = lambda impl: lambda q, k, v: (A.attention(q, k, v, spec, impl, 8) * cot).sum()
    for g_ref, g in zip(jax.grad(loss("einsum"), (0, 1, 2))(q, k, v), jax.grad(loss("xla"), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=0)
