"""sparsetrain: a training runtime for Mixture-of-Experts and N:M-sparse transformers.

Kept light on purpose: importing it pulls in torch only, never ray, deepspeed,
megatron, pynvml or CUDA initialisation.
"""
from sparsetrain.config import Config, ConfigError, load_config

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "__version__", "load_config"]
