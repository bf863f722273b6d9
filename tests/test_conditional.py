"""Conditional (prompt/response) training: the condition is never masked and never scored, the
bound is of -log p(response | prompt), and pairs data is checked record by record."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from brute import ExactDenoiser

from dlm.config import ConfigError, DiffusionConfig, HyperscheduleKind, Layout, PrimeConfig, load_config
from dlm.data.pipeline import load_data, pair_rows, validation_windows
from dlm.data.tokenizers import ByteTokenizer
from dlm.objectives import objective_for

V, L = 3, 4

OBJECTIVES = {
    "mdlm": DiffusionConfig(),
    "prime_l2": DiffusionConfig(prime=PrimeConfig(l=2)),
    "autoregressive": DiffusionConfig(hyperschedule=HyperscheduleKind.AUTOREGRESSIVE),
    "autoregressive_double": DiffusionConfig(hyperschedule=HyperscheduleKind.AUTOREGRESSIVE, layout=Layout.DOUBLE),
    "block2": DiffusionConfig(hyperschedule=HyperscheduleKind.BLOCK, block_width=2),
    "slide2": DiffusionConfig(hyperschedule=HyperscheduleKind.SLIDE, block_width=2),
}


def _per_sequence(name, apply_fn, x0, t, key, given):
    obj = objective_for(OBJECTIVES[name], V, False)
    layout = OBJECTIVES[name].layout
    if layout == Layout.DOUBLE:
        return obj.per_sequence(apply_fn, x0, t, key, given, layout).nelbo
    return obj.per_sequence(apply_fn, x0, t, key, given).nelbo


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_a_changed_prompt_token_changes_the_model_input_and_no_loss_term(name):
    """The model here ignores its input (logits depend on the position only), so a prompt token
    can reach the loss only as a scored term: the loss must not move when it changes, while the
    model input must change exactly there (the prompt is never masked)."""
    table = jax.random.normal(jax.random.key(0), (L, V))
    seen = []

    def apply_fn(xt, noise, attention=None, positions=None):
        seen.append(np.asarray(xt))
        n = xt.shape[1]
        return jnp.broadcast_to(jnp.tile(table, (n // L, 1)), (xt.shape[0], n, V))

    B = 64
    x0 = jax.random.randint(jax.random.key(1), (B, L), 0, V)
    given = jnp.broadcast_to(jnp.arange(L) < 2, (B, L))
    other = x0.at[:, 1].set((x0[:, 1] + 1) % V)
    t = jax.random.uniform(jax.random.key(2), (B,))
    a = _per_sequence(name, apply_fn, x0, t, jax.random.key(3), given)
    b = _per_sequence(name, apply_fn, other, t, jax.random.key(3), given)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    xa, xb = seen
    codes = xa.reshape(B, -1, L, *xa.shape[2:])  # the double layout feeds [clean | noised]: both halves
    other_codes = xb.reshape(codes.shape)
    changed = (codes != other_codes).reshape(B, codes.shape[1], L, -1).any(-1)
    assert changed[:, :, 1].all() and not changed[:, :, [0, 2, 3]].any()
    if name == "prime_l2":
        clean = objective_for(OBJECTIVES[name], V, False).codec.encode(np.asarray(x0))
        np.testing.assert_array_equal(xa[:, :2], clean[:, :2])  # every sub-token of the prompt is visible
    else:
        assert (codes[:, :, :2] == np.asarray(x0)[:, None, :2]).all()
    # without the condition the prompt positions are scored: the same change moves the loss
    seen.clear()
    a0 = _per_sequence(name, apply_fn, x0, t, jax.random.key(3), None)
    b0 = _per_sequence(name, apply_fn, other, t, jax.random.key(3), None)
    assert not np.allclose(np.asarray(a0), np.asarray(b0))


@pytest.mark.parametrize("name,given_positions", [("mdlm", (0, 1)), ("mdlm", (0, 2)), ("prime_l2", (1, 3)),
                                                  ("autoregressive", (0, 1)), ("autoregressive_double", (0, 1)),
                                                  ("block2", (0,))])
def test_the_bound_is_the_conditional_likelihood_under_the_exact_denoiser(name, given_positions):
    """With the exact denoiser of p over V^L every masked-diffusion bound is tight, so its mean over
    draws is -log p(response | given) per response position, for a prompt prefix and for any given
    set (infill). The unconditional bound of the same row is -log p(x) / L: a different number."""
    den = ExactDenoiser(V, L, seed=5)
    x = np.array([2, 0, 1, 2])
    given_mask = np.isin(np.arange(L), given_positions)
    ok = (den.seqs[:, given_mask] == x[given_mask]).all(1)
    target = -(den.log_prob(x) - np.log(den.p[ok].sum())) / (~given_mask).sum()
    obj_cfg = OBJECTIVES[name]
    B = 4096
    x0 = jnp.broadcast_to(jnp.asarray(x), (B, L))
    given = jnp.broadcast_to(jnp.asarray(given_mask), (B, L))
    if name == "prime_l2":
        codec = objective_for(obj_cfg, V, False).codec

        def apply_fn(yt, noise, attention=None, positions=None):  # partly visible tokens: marginalise by enumeration
            return prime_exact_logits(den, codec, yt)
    elif obj_cfg.layout == Layout.DOUBLE:
        def apply_fn(x2, noise, attention=None, positions=None):  # [clean | noised]: position b of the noised half
            clean, noised = x2[:, :L], x2[:, L:]  # sees the clean positions before it and itself (width-1 blocks)
            pos = jnp.arange(L)
            rows = [den.logits(jnp.where(pos < b, clean, jnp.where(pos == b, noised, V)))[:, b] for b in range(L)]
            return jnp.concatenate([jnp.zeros((x2.shape[0], L, V)), jnp.stack(rows, axis=1)], axis=1)
    else:
        def apply_fn(xt, noise, attention=None, positions=None):
            return den.logits(xt)
    t = jax.random.uniform(jax.random.key(7), (B,))
    per = np.asarray(jax.jit(lambda t, k: _per_sequence(name, apply_fn, x0, t, k, given))(t, jax.random.key(8)), np.float64)
    mean, se = per.mean(), per.std(ddof=1) / np.sqrt(B)
    assert abs(mean - target) < 4 * se + 1e-6, (mean, se, target)
    assert abs(target - (-den.log_prob(x) / L)) > 0.05


def prime_exact_logits(den: ExactDenoiser, codec, yt):
    """Exact Prime denoiser: log p(x0^i | the visible sub-tokens of every position) by enumeration."""
    seqs = jnp.asarray(den.seqs)  # [S, L]
    codes = codec.encode(seqs)  # [S, L, l]
    visible = yt != codec.mask_id  # [B, L, l]
    agree = ((codes[None] == yt[:, None]) | ~visible[:, None]).all(-1).all(-1)  # [B, S]
    post = jnp.asarray(den.p)[None] * agree
    post = post / post.sum(-1, keepdims=True)
    probs = jnp.einsum("bs,slv->blv", post, jax.nn.one_hot(seqs, V))
    return jnp.log(jnp.maximum(probs, 1e-30))


def test_pairs_rows_hold_the_prompt_as_given_and_the_response_with_eos_padding():
    tok = ByteTokenizer()
    rows = pair_rows(tok, [("ab", "xyz"), ("q", "r")], 8, "test")
    np.testing.assert_array_equal(rows["given"][0], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(rows["given"][1], [1, 0, 0, 0, 0, 0, 0, 0])
    assert tok.decode(rows["tokens"][0][:5]) == "abxyz" and (rows["tokens"][0][5:] == tok.eos_id).all()
    assert tok.decode(rows["tokens"][1][:2]) == "qr" and (rows["tokens"][1][2:] == tok.eos_id).all()


@pytest.mark.parametrize("record,match", [
    ({"prompt": "hello", "response": ""}, "Record 2 of .* has an empty response"),
    ({"prompt": "x" * 40, "response": "y"}, "Record 2 of .* has a prompt of 40 tokens, which leaves no room for a response"),
    ({"prompt": "x" * 20, "response": "y" * 20}, "Record 2 of .* needs 41 tokens"),
    ({"prompt": "x"}, "Record 2 of .* has no text in field 'response'"),
])
def test_bad_pairs_are_one_sentence(tmp_path, root, record, match):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"prompt": "a", "response": "b"}, record]) + "\n")
    cfg = load_config(root / "configs/test.yaml", ["data.source=files", f"data.paths=[{path}]", f"data.validation_paths=[{path}]",
                                                  "data.format=pairs"])
    with pytest.raises(ConfigError, match=match) as e:
        load_data(cfg.data)
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")


def test_pairs_format_is_refused_where_it_has_no_meaning(root):
    with pytest.raises(ConfigError, match="data.format=pairs needs a source of prompt/response records"):
        load_config(root / "configs/test.yaml", ["data.format=pairs"])
    with pytest.raises(ConfigError, match="data.format=pairs is not supported with diffusion.process=epsilon_hybrid"):
        load_config(root / "configs/test.yaml", ["data.format=pairs", "data.source=addition", "data.seq_len=27",
                                                 "diffusion.process=epsilon_hybrid"])


def test_a_pairs_run_trains_and_reports_the_response_bound(tmp_path, root):
    """JSONL pairs end to end: the trainer's batches and validation rows carry the condition, and its
    validation bound is of the responses (it differs from the bound of the whole rows)."""
    from dlm.train.trainer import Trainer

    recs = [{"prompt": f"{i} + {i} =", "response": f" {2 * i}"} for i in range(200)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    cfg = load_config(root / "configs/test.yaml", [f"workdir={tmp_path}/run", "data.source=files", f"data.paths=[{path}]",
                                                  "data.format=pairs", "data.seq_len=16", "train.steps=4",
                                                  "train.checkpoint_every=2"])
    trainer = Trainer(cfg)
    rows = validation_windows(trainer.data, 8)
    assert rows["given"].any(1).all() and (~rows["given"]).any(1).all()
    out = trainer.run()
    assert np.isfinite(out["nelbo"]) and out["step"] == 4
    # the response bound differs from the bound of the whole row
    from dlm.eval.likelihood import evaluate, make_eval_fn

    fn = make_eval_fn(trainer.graphdef, trainer.objective, 1)
    cond = evaluate(fn, trainer.state.params, rows, 8)["nelbo"]
    whole = evaluate(fn, trainer.state.params, rows["tokens"], 8)["nelbo"]
    assert cond != whole
