"""sala: MiniCPM-SALA hybrid sparse/linear attention language models in PyTorch.

``import sala`` registers the ``minicpm_sala`` config and models with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads a MiniCPM-SALA checkpoint without remote code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import SALACache
from .config import ConfigError, SALAConfig, release_config
from .modeling import CheckpointError, SALAForCausalLM, SALAModel, SALAPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(SALAConfig.model_type, SALAConfig, exist_ok=True)
AutoModel.register(SALAConfig, SALAModel, exist_ok=True)
AutoModelForCausalLM.register(SALAConfig, SALAForCausalLM, exist_ok=True)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "SALACache",
    "SALAConfig",
    "SALAForCausalLM",
    "SALAModel",
    "SALAPreTrainedModel",
    "release_config",
]
