import pytest

from dlm.config import ConfigError, Schedule, load_config, save_config


def test_defaults_extends_and_overrides(root, tmp_path):
    cfg = load_config(root / "configs/quickstart.yaml", ["model.num_layers=2", "train.steps=50", "train.lr=1e-3",
                                                         "diffusion.schedule=cosine"])
    assert cfg.model.num_layers == 2 and cfg.train.steps == 50
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.diffusion.schedule is Schedule.COSINE
    assert cfg.model.mlp_dim == 352  # from quickstart.yaml
    assert cfg.train.b2 == pytest.approx(0.99)  # from base.yaml, which quickstart extends
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


def _error(overrides, path=None):
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    msg = str(e.value)
    assert "\n" not in msg and msg.rstrip().endswith((".", "?"))
    return msg


def test_misspelt_key_names_the_right_one():
    msg = _error(["model.num_layer=2"])
    assert "model.num_layer" in msg and "model.num_layers" in msg


def test_unknown_section():
    assert "model" in _error(["modle.num_layers=2"])


def test_wrong_type():
    msg = _error(["model.num_layers=two"])
    assert "model.num_layers" in msg and "int" in msg
    assert "train.lr" in _error(["train.lr=fast"])
    assert "model.noise_conditioning" in _error(["model.noise_conditioning=3"])


def test_invalid_choice_suggests():
    msg = _error(["diffusion.schedule=cosin"])
    assert "'cosine'" in msg


def test_cross_field_checks():
    assert "num_heads" in _error(["model.d_model=130", "model.num_heads=4"])
    assert "data.paths" in _error(["data.source=files"])
    assert "data.markov.noise=0.0 in (0, 1)" in _error(["data.source=markov", "data.markov.structure=cycle", "data.markov.noise=0"])
    assert "data.markov.branches=9 must be in [0, num_states=8]" in _error(["data.source=markov", "data.markov.structure=cycle",
                                                                          "data.markov.branches=9"])


def test_missing_file(tmp_path):
    assert "does not exist" in _error([], tmp_path / "nope.yaml")
