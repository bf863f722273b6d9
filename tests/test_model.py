import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dlm
from dlm.config import load_config
from dlm.mesh import make_mesh


def _cfg(root, *over):
    return load_config(root / "configs/test.yaml", list(over))


def test_every_parameter_has_logical_axis_names(root):
    model = dlm.build_model(_cfg(root, "model.noise_conditioning=true", "model.qk_norm=true"))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, (path, names)


def test_logits_cover_the_vocabulary_but_not_the_mask(root):
    model = dlm.build_model(_cfg(root))
    x = jnp.full((2, 32), 257, jnp.int32).at[:, :4].set(3)
    logits = model(x)
    assert logits.shape == (2, 32, 257) and logits.dtype == jnp.float32


def test_noise_conditioning_uses_the_noise_level(root):
    model = dlm.build_model(_cfg(root, "model.noise_conditioning=true"))
    # adaLN starts at zero: perturb it so t can matter
    for blk_param in ("ada",):
        v = getattr(model.blocks, blk_param)
        v[...] = 0.1 * jax.random.normal(jax.random.key(0), v.shape)
    x = jnp.zeros((1, 32), jnp.int32)
    a = model(x, noise=jnp.full((1, 32), 0.2))
    b = model(x, noise=jnp.full((1, 32), 0.8))
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_remat_policies_give_the_same_loss_and_gradients(root):
    cfgs = [_cfg(root, f"model.remat={r}") for r in ("none", "full", "dots")]
    x = jax.random.randint(jax.random.key(0), (8, 32), 0, 257)
    outs = []
    for cfg in cfgs:
        model = dlm.build_model(cfg, seed=0)
        g, params = nnx.split(model)

        def loss(p):
            return dlm.nelbo(nnx.merge(g, p), x, cfg.diffusion, jax.random.key(1))[0]

        outs.append(jax.value_and_grad(loss)(params))
    for v, gr in outs[1:]:
        np.testing.assert_allclose(float(v), float(outs[0][0]), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(gr), jax.tree.leaves(outs[0][1])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_bfloat16_compute_keeps_float32_parameters_and_logits_close_to_float32(root):
    mesh = make_mesh(devices=jax.devices()[:1])
    cfg16 = _cfg(root, "model.dtype=bfloat16")
    model16 = dlm.build_model(cfg16, mesh=mesh, seed=0)
    model32 = dlm.build_model(_cfg(root), mesh=mesh, seed=0)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    x = jax.random.randint(jax.random.key(0), (8, 32), 0, 258)  # tokens and masks
    a, b = model16(x), model32(x)
    assert a.dtype == jnp.float32
    assert float(jnp.abs(a - b).max()) < 2e-2 * float(jnp.abs(b).max()), float(jnp.abs(a - b).max())
    rows = jax.random.randint(jax.random.key(1), (8, 32), 0, 257)
    l16 = float(dlm.nelbo(model16, rows, cfg16.diffusion, jax.random.key(2), 4)[0])
    l32 = float(dlm.nelbo(model32, rows, cfg16.diffusion, jax.random.key(2), 4)[0])
    assert abs(l16 - l32) < 0.01 * l32, (l16, l32)


def test_attention_kernels_agree(root):
    from dlm.models.attention import einsum_attention

    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 16, 4, 8))
    mask = jnp.tril(jnp.ones((16, 16), bool))[None, None]
    for m in (None, mask):
        ref = jax.nn.dot_product_attention(q, k, v, mask=m)
        np.testing.assert_allclose(einsum_attention(q, k, v, m), ref, rtol=1e-5, atol=1e-5)
    # a row with no visible key gives zeros, not NaN
    empty = jnp.zeros((1, 1, 16, 16), bool).at[..., 1:, :].set(True)
    out = einsum_attention(q, k, v, empty)
    assert bool(jnp.isfinite(out).all()) and float(jnp.abs(out[:, 0]).max()) == 0.0


def test_grid_and_absolute_position_embeddings_follow_row_column_and_box(root):
    model = dlm.build_model(_cfg(root, "data.seq_len=36", "model.grid=[6,6,2,3]", "model.learned_positions=40"))
    pos = jnp.arange(36)[None]
    emb = np.asarray(model._position_embedding(pos))[0]
    row, col, box, ab = (np.asarray(getattr(model, n)[...]) for n in ("row_embed", "col_embed", "box_embed", "pos_embed"))
    for p in range(36):
        r, c = divmod(p, 6)
        np.testing.assert_allclose(emb[p], ab[p] + row[r] + col[c] + box[(r // 2) * 2 + c // 3], rtol=1e-6, atol=1e-6)
    # and they reach the logits: the same tokens at shifted positions give other logits
    x = jnp.zeros((1, 36), jnp.int32)
    assert float(jnp.abs(model(x) - model(x, positions=pos[:, ::-1])).max()) > 1e-3


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(root):
    """Per-head RMSNorm on q and k: scaling wq and wk changes nothing with it, and changes the
    logits without it; its own scales do change them. (norm_eps is made negligible: the
    epsilon is the one term that sees the scale.)"""
    x = jax.random.randint(jax.random.key(1), (2, 32), 0, 257)
    for qk_norm in (True, False):
        model = dlm.build_model(_cfg(root, f"model.qk_norm={str(qk_norm).lower()}", "model.norm_eps=1e-20"), seed=3)
        before = model(x)
        model.blocks.wq[...] = 5.0 * model.blocks.wq[...]
        model.blocks.wk[...] = 3.0 * model.blocks.wk[...]
        after = model(x)
        if qk_norm:
            np.testing.assert_allclose(after, before, atol=1e-5)
            model.blocks.q_norm[...] = 3.0 * model.blocks.q_norm[...]
            assert float(jnp.abs(model(x) - before).max()) > 1e-3
        else:
            assert float(jnp.abs(after - before).max()) > 1e-3


def test_qk_norm_keys_from_the_cache_equal_recomputed_ones(root):
    """A block-hyperschedule run with QK-norm: the cached loop gives the uncached loop's tokens
    (the cache holds normalised, rotated keys)."""
    cfg = _cfg(root, "model.qk_norm=true", "diffusion.hyperschedule=block", "diffusion.block_width=8", "sampling.steps=4")
    model = dlm.build_model(cfg, seed=0)
    sc = cfg.sampling
    out = [dlm.generate(model, [5, 6, 7], dataclasses.replace(sc, cache=c, temperature=1.0, seed=2), diffusion=cfg.diffusion,
                        num_samples=2, length=32)["tokens"] for c in (True, False)]
    np.testing.assert_array_equal(out[0], out[1])


def test_a_qk_norm_model_is_refused_by_the_llada_layout_in_one_sentence(root):
    import pytest

    from dlm.config import ConfigError
    from dlm.interop import hf

    model = dlm.build_model(_cfg(root, "model.qk_norm=true"))
    with pytest.raises(ConfigError, match=r"^This model cannot be written in the llada layout: its QK-norm has no place in the "
                                          r"llada layout\.$"):
        hf.exportable(model, "llada")
