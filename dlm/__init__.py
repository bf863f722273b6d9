"""dlm: discrete diffusion language models in JAX / Flax NNX.

    cfg = dlm.load_config("configs/quickstart.yaml", ["model.num_layers=2"])
    model = dlm.build_model(cfg)
    loss, metrics = dlm.nelbo(model, batch, cfg.diffusion, jax.random.key(0))
    out = dlm.generate(model, prompt, cfg.sampling, length=cfg.data.seq_len)
    model, cfg = dlm.restore("runs/quickstart")
    model = dlm.load_pretrained("/models/LLaDA-8B-Instruct", dtype="bfloat16")  # a published checkpoint folder
"""

from dlm.api import build_model, generate, load_config, load_tokenizer, nelbo, restore
from dlm.config import Config, ConfigError
from dlm.interop.hf import load_pretrained

__all__ = ["load_config", "build_model", "nelbo", "generate", "restore", "load_tokenizer", "load_pretrained", "Config",
           "ConfigError"]
__version__ = "0.1.0"
