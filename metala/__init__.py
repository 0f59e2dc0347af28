"""metala: the MetaLA (Meta Linear Attention, arXiv 2411.10741) model library.

    >>> from metala import MetaLAConfig, MetaLAForCausalLM
    >>> model = MetaLAForCausalLM(MetaLAConfig.from_preset("tiny"))
"""

from metala.cache import LayerCache, MetaLACache
from metala.config import PRESETS, MetaLAConfig
from metala.model import MetaLABlock, MetaLAForCausalLM, MetaLAOutput, next_token_labels

__all__ = [
    "PRESETS",
    "LayerCache",
    "MetaLABlock",
    "MetaLACache",
    "MetaLAConfig",
    "MetaLAForCausalLM",
    "MetaLAOutput",
    "next_token_labels",
]
__version__ = "0.1.0"
