"""xft-megatron: XFT (upcycle -> shared-expert MoE -> learned merge) on Megatron-Core.

The package is built in layers, one folder per concept, listed bottom first in LAYERS. A module
may import only from its own folder or from folders of lower layers (function-level imports
and imports under TYPE_CHECKING included), and no modules import each other in a cycle;
tests/unit/test_layers.py reads this list and enforces both. benchmarks/ and tools/ sit above `cli`.
"""

__version__ = "0.1.0"

LAYERS = ("errors", "arch", "config", "runtime", "data", "model", "checkpoint", "hf", "xft",
          "training", "sandbox", "eval", "pipeline", "cli")
