"""xft-megatron: XFT (upcycle -> shared-expert MoE -> learned merge) on Megatron-Core."""

__version__ = "0.1.0"
