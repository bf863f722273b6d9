"""dlm: discrete diffusion language models in JAX / Flax NNX.

    cfg = dlm.load_config("configs/quickstart.yaml", ["model.num_layers=2"])
    model = dlm.build_model(cfg)
    loss, metrics = dlm.nelbo(model, batch, cfg.diffusion, jax.random.key(0))
    out = dlm.generate(model, prompt, cfg.sampling, length=cfg.data.seq_len)
    model, cfg = dlm.restore("runs/quickstart")
"""

from dlm.api import build_model, generate, load_config, load_tokenizer, nelbo, restore
from dlm.config import Config, ConfigError

__all__ = ["load_config", "build_model", "nelbo", "generate", "restore", "load_tokenizer", "Config", "ConfigError"]
__version__ = "0.1.0"
