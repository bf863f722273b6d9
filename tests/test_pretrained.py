"""Published checkpoints: LLaDA, Dream and MDLM-OWT folders imported, run and exported.

The folders under tests/fixtures/pretrained/ are tiny random models in each family's released
layout, with reference logits from transformers' Llama / Qwen2 (bidirectional through a 4-D
zero mask) and from a numpy DiT; tests/fixtures/make_pretrained_fixtures.py made them.
"""

import json
import pathlib
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dlm
from dlm.config import ConfigError, DecodeCache, DecodeConfig, SamplingConfig
from dlm.interop import hf
from dlm.interop.safetensors import Folder, write
from dlm.mesh import make_mesh
from dlm.models.logits import NEVER
from dlm.sampling import parallel as par

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "pretrained"
FAMILIES = ("llada", "dream", "mdlm")


def one_device():
    return make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def models():
    return {f: dlm.load_pretrained(FIXTURES / f, mesh=one_device()) for f in FAMILIES}


def reference(family):
    ref = np.load(FIXTURES / family / "reference.npz")
    return ref["input_ids"].astype(np.int32), ref["logits"]


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_equal_the_reference_and_every_key_is_used_once(family, models):
    used = []
    model = dlm.load_pretrained(FIXTURES / family, mesh=one_device(), progress=used.append)
    folder = Folder(FIXTURES / family)
    assert sorted(used) == sorted(k for k in folder.keys() if not k.endswith("rotary_emb.inv_freq"))
    assert len(used) == len(set(used))
    ids, want = reference(family)
    got = np.asarray(model(jnp.asarray(ids)))
    if family == "dream":  # Dream predicts position i from output i - 1
        want = np.concatenate([want[:, :1], want[:, :-1]], axis=1)
    cols = np.arange(got.shape[-1]) != model.mask_id
    if family == "mdlm":  # the reference's last column is the mask's logit, which SUBS never predicts
        want = want[..., : model.vocab_size]
    assert got.shape == want.shape
    assert np.abs(got[..., cols] - want[..., cols]).max() < 1e-4
    if model.mask_id < model.vocab_size:
        assert (got[..., model.mask_id] == NEVER).all()


def _model_fn(model):
    """The decoder's model_fn; the module is merged where it is called (inside loops, too)."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    module = lambda: nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    return lambda t, p, a, kv, r: module()(t, positions=p, attention=a, kv_cache=kv, return_kv=r)


def _passes(model, cache, L, Bk, start):
    fn = _model_fn(model)
    S = L - start - Bk if cache == DecodeCache.PREFIX else 1
    return par.Passes(fn, 2, L, Bk, 8, max(S, 1), False, cache, model.mask_id, shift=model.cfg.shift_logits)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("cache", [DecodeCache.PREFIX, DecodeCache.DUAL])
@pytest.mark.parametrize("start", [0, 6])
def test_cached_block_logits_equal_the_full_forward(family, cache, start, models):
    model = models[family]
    ids, _ = reference(family)
    x = jnp.asarray(ids)
    ctx = _passes(model, cache, x.shape[1], 4, start)
    full, kv = ctx.full(x, start, None, True)
    C = ctx.cache_length()
    cached = ctx.cached(x, start, None, kv[0][:, :, :C], kv[1][:, :, :C])
    assert np.abs(np.asarray(cached) - np.asarray(full)).max() < 1e-5


def test_dream_sampler_decodes_from_the_shifted_logits(models):
    model = models["dream"]
    ids, raw = reference("dream")
    P, Bk = 4, 4
    out = par.parallel_decode(_model_fn(model), jnp.asarray(ids),
                              P, jax.random.key(0), DecodeConfig(block_length=Bk), mask_id=model.mask_id,
                              vocab_size=model.vocab_size, eos_id=-1, temperature=0.0, float64=False, trace=True,
                              shift=True)
    first = np.asarray(out["refresh_logits"][0])  # the first block's first pass: positions P..P+Bk-1 of the input
    cols = np.arange(first.shape[-1]) != model.mask_id
    assert np.abs(first[..., cols] - raw[:, P - 1:P - 1 + Bk][..., cols]).max() < 1e-4
    assert np.abs(first[..., cols] - raw[:, P:P + Bk][..., cols]).max() > 0.1  # the unshifted logits are another thing


def _sampling(**decode):
    return SamplingConfig(sampler="parallel", temperature=0.0, decode=DecodeConfig(**decode))


@pytest.mark.parametrize("family,cache", [("dream", "none"), ("dream", "dual"), ("llada", "prefix")])
def test_left_padded_prompts_get_the_greedy_tokens_they_get_alone(family, cache, models):
    model = models[family]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 100, 3).tolist(), rng.integers(0, 100, 6).tolist()]
    G = 12
    sc = _sampling(block_length=4, tau=0.9, cache=cache)
    batched = dlm.generate(model, cfg=sc, prompts=prompts, length=6 + G)["tokens"]
    for b, p in enumerate(prompts):
        alone = dlm.generate(model, p, sc, num_samples=1, length=len(p) + G)["tokens"][0]
        np.testing.assert_array_equal(batched[b, 6:], alone[len(p):])
        np.testing.assert_array_equal(batched[b, 6 - len(p):6], p)


def test_left_padded_prompts_shard_over_a_mesh_with_the_same_tokens(models):
    mesh = make_mesh()  # 8 devices on data: the two rows are padded out to 8
    model = dlm.load_pretrained(FIXTURES / "dream", mesh=mesh)
    sc = _sampling(block_length=4, cache="dual")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    sharded = dlm.generate(model, cfg=sc, prompts=prompts, length=18, mesh=mesh)["tokens"]
    np.testing.assert_array_equal(sharded, dlm.generate(models["dream"], cfg=sc, prompts=prompts, length=18)["tokens"])


@pytest.mark.parametrize("family,sampler", [
    ("llada", SamplingConfig(sampler="ancestral", steps=8)),
    ("llada", _sampling(block_length=4, score="margin", credit=True)),
    ("dream", _sampling(block_length=4, suffix_dropout=True, window=8, cache="prefix")),
    ("dream", _sampling(block_length=4, rule="factor", score="entropy", cache="dual")),
    ("mdlm", SamplingConfig(sampler="ancestral", steps=8, temperature=1.0)),
])
def test_every_decoder_fills_an_imported_model_and_keeps_its_prompt(family, sampler, models):
    model = models[family]
    prompt = [5, 17, 9, 33]
    out = dlm.generate(model, prompt, sampler, num_samples=2, length=16)
    t = out["tokens"]
    assert (t[:, :4] == prompt).all()
    assert ((t >= 0) & (t < model.vocab_size) & (t != model.mask_id)).all()


def _bytes_equal(a: Folder, b: Folder):
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        x, y = a.read(k), b.read(k)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), k
        assert x.tobytes() == y.tobytes(), k


def test_converted_llada_exports_back_to_the_fixture_and_samples(tmp_path, capsys):
    from dlm.convert import export_workdir, import_folder

    work = tmp_path / "work"
    import_folder(FIXTURES / "llada", work)
    export_workdir(work, tmp_path / "out", "llada")
    _bytes_equal(Folder(FIXTURES / "llada"), Folder(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((FIXTURES / "llada" / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (FIXTURES / "llada" / name).read_bytes()
    from dlm.cli import sample_main

    sample_main(["--workdir", str(work), "--chat", "what is the answer?", "--num-samples", "1", "--length", "24",
                 "sampling.sampler=parallel", "sampling.decode.block_length=4", "sampling.decode.cache=dual"])
    record = json.loads((work / "samples.jsonl").read_text().splitlines()[0])
    assert record["prompt"] == "what is the answer?" and record["nfe"] >= 1


@pytest.mark.parametrize("family", ["dream", "mdlm"])
def test_export_in_the_family_layout_gives_back_the_checkpoint_bit_for_bit(family, models, tmp_path):
    config = json.loads((FIXTURES / family / "config.json").read_text())
    hf.export(models[family], tmp_path, family, base_config=config)
    _bytes_equal(Folder(FIXTURES / family), Folder(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text()) == config


def test_a_model_trained_here_round_trips_through_the_llada_layout(tmp_path):
    cfg = dlm.load_config(pathlib.Path(__file__).resolve().parents[1] / "configs/test.yaml", ["model.num_layers=2"])
    model = dlm.build_model(cfg, mesh=one_device(), seed=1)  # the byte model: 257 tokens, mask 257 appended
    hf.export(model, tmp_path, "llada")
    back = dlm.load_pretrained(tmp_path, mesh=one_device())
    assert back.vocab_size == model.vocab_size + 1 and back.mask_id == model.mask_id
    x = jnp.asarray(np.random.default_rng(0).integers(0, 258, (2, 12)), jnp.int32)
    a, b = np.asarray(model(x)), np.asarray(back(x))
    np.testing.assert_array_equal(a, b[..., : model.vocab_size])
    hf.export(back, tmp_path / "again", "llada")
    _bytes_equal(Folder(tmp_path), Folder(tmp_path / "again"))


def test_fine_tuning_starts_from_the_converted_parameters(tmp_path):
    from dlm.convert import import_folder
    from dlm.train.trainer import train

    work = tmp_path / "work"
    import_folder(FIXTURES / "dream", work)
    before, _ = dlm.restore(work, mesh=one_device())
    cfg = dlm.load_config(work / "config.yaml", ["train.steps=1", "train.lr=0", "train.batch_size=8", "data.seq_len=16",
                                                 "train.eval_windows=2", "train.eval_t_samples=1", "train.progress=false",
                                                 "train.warmup_steps=1", "sampling.length=16"])
    out = train(cfg)
    after, _ = dlm.restore(work, mesh=one_device())
    assert (work / "checkpoints" / "1").exists() and np.isfinite(out["nelbo"])
    for (p, a), (_, b) in zip(jax.tree.leaves_with_path(jax.tree.map(np.asarray, jax.device_get(jax.tree.leaves(before)))),
                              jax.tree.leaves_with_path(jax.tree.map(np.asarray, jax.device_get(jax.tree.leaves(after))))):
        np.testing.assert_array_equal(a, b)


def _copy(tmp_path, family="llada"):
    d = tmp_path / family
    shutil.copytree(FIXTURES / family, d)
    return d


def _rewrite(path, change):
    f = Folder(path.parent) if path.name == "model.safetensors" else None
    from dlm.interop.safetensors import SafetensorsFile

    src = SafetensorsFile(path)
    tensors = {k: src.read(k) for k in src.keys()}
    change(tensors)
    write(path, [(k, v.shape, v.dtype, (lambda v=v: v)) for k, v in tensors.items()])
    return f


def test_bad_folders_are_one_sentence_naming_the_problem(tmp_path):
    def fails(path, *words, **kw):
        with pytest.raises(ConfigError) as e:
            dlm.load_pretrained(path, mesh=one_device(), **kw)
        msg = str(e.value)
        assert all(w in msg for w in words), msg
        assert msg.count(". ") == 0 and "\n" not in msg

    fails(tmp_path / "nowhere", "does not exist")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "holds no config.json")
    d = _copy(tmp_path / "a")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2", architectures=["GPT2LMHeadModel"])))
    fails(d, "gpt2", "family")
    d = _copy(tmp_path / "b")
    (d / "model-00002-of-00002.safetensors").unlink()
    fails(d, "model-00002-of-00002.safetensors", "missing")
    d = _copy(tmp_path / "c")
    shard = d / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    fails(d, "truncated")
    d = _copy(tmp_path / "d", "dream")
    _rewrite(d / "model.safetensors", lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros((2, 2), np.float32)}))
    fails(d, "model.layers.0.self_attn.extra.weight", "not part of the dream layout")
    d = _copy(tmp_path / "e", "dream")
    _rewrite(d / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    fails(d, "model.layers.1.mlp.up_proj.weight", "has no")
    d = _copy(tmp_path / "f", "dream")
    _rewrite(d / "model.safetensors", lambda t: t.update({"model.norm.weight": np.ones(65, np.float32)}))
    fails(d, "model.norm.weight", "[65]", "[64]")


def test_chat_templates_render_in_a_sandbox(tmp_path):
    tok = dlm.load_tokenizer(FIXTURES / "llada")
    ids = tok.encode_chat("what is the answer?")
    text = tok.decode(ids)
    assert text.startswith("<|startoftext|> <|start_header_id|> user <|end_header_id|> what is the answer?")
    assert text.endswith("<|start_header_id|> assistant <|end_header_id|>")
    d = _copy(tmp_path, "llada")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(ConfigError, match="SecurityError"):
        dlm.load_tokenizer(d).encode_chat("hello")


def test_sample_script_reads_a_published_folder_and_reports_bad_ones(tmp_path, capsys):
    from dlm.cli import sample_main

    sample_main(["--pretrained", str(FIXTURES / "dream"), "--prompt", "the world is", "--num-samples", "1", "--length", "12",
                 "sampling.sampler=parallel", "sampling.decode.block_length=4"])
    assert "--- sample 0" in capsys.readouterr().out
    d = _copy(tmp_path, "dream")
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 10 ** 6) + b"{}")
    with pytest.raises(SystemExit):
        sample_main(["--pretrained", str(d)])
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "truncated" in err and err.count("\n") == 1


def test_bfloat16_import_stays_near_the_float32_reference():
    model = dlm.load_pretrained(FIXTURES / "dream", mesh=one_device(), dtype="bfloat16")
    assert {a.dtype for a in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.bfloat16)}
    ids, want = reference("dream")
    want = np.concatenate([want[:, :1], want[:, :-1]], axis=1)
    got = np.asarray(model(jnp.asarray(ids)))
    cols = np.arange(got.shape[-1]) != model.mask_id
    err = np.abs(got[..., cols] - want[..., cols]).max()
    assert 1e-4 < err < 0.05 * np.abs(want).max()  # bfloat16 rounding: visible, and within 5% of the largest logit


@pytest.fixture(scope="module")
def byte_workdir(tmp_path_factory):
    """A model trained here for 2 steps on the builtin corpus, with its byte tokenizer."""
    from dlm.train.trainer import train

    work = tmp_path_factory.mktemp("byte") / "run"
    cfg = dlm.load_config(pathlib.Path(__file__).resolve().parents[1] / "configs/test.yaml",
                          [f"workdir={work}", "train.steps=2", "data.max_documents=20", "model.num_layers=1"])
    train(cfg)
    return work


def test_a_byte_model_exports_its_special_ids_and_no_dropout(byte_workdir, tmp_path):
    """LLaDA's reader falls back to GPT-2's id 50256 without eos/pad ids, and to dropout 0.1
    without dropout settings: the export writes both, every id inside the vocabulary."""
    from dlm.convert import export_workdir

    export_workdir(byte_workdir, tmp_path / "hf", "llada")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"], config["mask_token_id"]) == (256, 256, 257)
    assert all(config[k] < config["embedding_size"] for k in ("eos_token_id", "pad_token_id", "mask_token_id"))
    assert config["attention_dropout"] == config["residual_dropout"] == config["embedding_dropout"] == 0.0
    assert "auto_map" not in config
    back = dlm.load_pretrained(tmp_path / "hf", mesh=one_device())  # the folder still loads
    assert back.mask_id == 257


def test_modeling_dir_is_copied_and_named_in_auto_map(byte_workdir, tmp_path, capsys):
    from dlm.convert import export_workdir, main

    code = tmp_path / "llada_code"
    code.mkdir()
    (code / "configuration_llada.py").write_text("class LLaDAConfig:\n    pass\n")
    (code / "modeling_llada.py").write_text("class LLaDAModelLM:\n    pass\n")
    (code / "generation_utils.py").write_text("def generate():\n    pass\n")
    export_workdir(byte_workdir, tmp_path / "hf", "llada", modeling_dir=code)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                                  "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}
    for f in code.iterdir():
        assert (tmp_path / "hf" / f.name).read_bytes() == f.read_bytes()
    (code / "modeling_llada.py").write_text("class SomethingElse:\n    pass\n")
    with pytest.raises(SystemExit):
        main(["--to", "llada", "--from", str(byte_workdir), "--out", str(tmp_path / "hf2"), "--modeling-dir", str(code)])
    assert "defines no class LLaDAModelLM" in capsys.readouterr().err
    (code / "modeling_llada.py").unlink()
    with pytest.raises(SystemExit):
        main(["--to", "llada", "--from", str(byte_workdir), "--out", str(tmp_path / "hf3"), "--modeling-dir", str(code)])
    assert "has no modeling_llada.py" in capsys.readouterr().err
    assert not (tmp_path / "hf2").exists() and not (tmp_path / "hf3").exists()


def test_an_exported_model_gives_the_mask_no_probability_in_code_that_does_not_hide_it(byte_workdir, tmp_path):
    """LLaDA's and Fast-dLLM's code take a softmax over every column, the mask's included. The
    export's output bias is 0 but for -1e4 on the mask's logit: logits computed as that code
    does (the final hidden state @ the head, + the bias) give the mask a probability below 1e-6
    at every position, and every other bias in the folder is zero. (scripts/llada_mask_check.py
    runs LLaDA's own modeling code on such a folder: torch, not in CI.)"""
    from dlm.convert import export_workdir

    export_workdir(byte_workdir, tmp_path / "hf", "llada")
    folder = Folder(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["include_bias"] is True and config["bias_for_layer_norm"] is False
    biases = [k for k in folder.keys() if k.endswith(".bias")]
    head_bias = folder.read("model.transformer.ff_out.bias")
    assert len(biases) == 7 * config["n_layers"] + 1
    assert all(not folder.read(k).any() for k in biases if k != "model.transformer.ff_out.bias")
    mask = config["mask_token_id"]
    assert head_bias[mask] == -1e4 and not np.delete(head_bias, mask).any()
    back = dlm.load_pretrained(tmp_path / "hf", mesh=one_device())
    x = jnp.asarray(np.random.default_rng(0).integers(0, 258, (4, 64)), jnp.int32)
    x = x.at[:, ::3].set(mask)  # positions holding the mask too, as during decoding
    lazy = back(x, head=False)
    logits = np.asarray(lazy.hidden, np.float32) @ np.asarray(lazy.head, np.float32)[:, : head_bias.shape[0]] + head_bias
    p_mask = np.exp(logits[..., mask] - logits.max(-1)) / np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)
    assert p_mask.max() < 1e-6
    without = logits - head_bias  # what the same code saw before: the untrained mask row's own logit
    q = np.exp(without[..., mask] - without.max(-1)) / np.exp(without - without.max(-1, keepdims=True)).sum(-1)
    assert q.max() > 1e-6  # so the check above could fail


def test_a_folder_with_nonzero_biases_is_refused_in_one_sentence(byte_workdir, tmp_path):
    from dlm.convert import export_workdir
    from dlm.interop.safetensors import write

    export_workdir(byte_workdir, tmp_path / "hf", "llada")
    folder = Folder(tmp_path / "hf")
    tensors = {k: folder.read(k) for k in folder.keys()}
    tensors["model.transformer.blocks.0.attn_out.bias"] = np.full_like(tensors["model.transformer.blocks.0.attn_out.bias"], 0.5)
    (tmp_path / "hf" / "model.safetensors").unlink()
    write(tmp_path / "hf" / "model.safetensors", [(k, a.shape, a.dtype, (lambda a=a: a)) for k, a in tensors.items()])
    with pytest.raises(dlm.config.ConfigError, match="attn_out.bias holds nonzero biases"):
        dlm.load_pretrained(tmp_path / "hf", mesh=one_device())


def test_re_exporting_an_imported_dlm_export_keeps_the_mask_bias(tmp_path):
    """export -> import -> export with the first export's config.json as the base (what an
    imported workdir's export does): the -1e4 on the mask's logit is still there."""
    cfg = dlm.load_config(pathlib.Path(__file__).resolve().parents[1] / "configs/test.yaml", ["model.num_layers=1"])
    model = dlm.build_model(cfg, mesh=one_device(), seed=1)
    hf.export(model, tmp_path / "a", "llada")
    back = dlm.load_pretrained(tmp_path / "a", mesh=one_device())
    base = json.loads((tmp_path / "a" / "config.json").read_text())
    hf.export(back, tmp_path / "b", "llada", base_config=base)
    _bytes_equal(Folder(tmp_path / "a"), Folder(tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "config.json").read_text()) == base
