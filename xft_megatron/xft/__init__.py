"""The XFT method's transforms and tools: dense -> MoE weights (`upcycle`), MoE -> dense weights
(`merge`: the fold), and both applied to whole Megatron checkpoints, streamed layer by layer
(`checkpoints`: `xft upcycle`, `xft merge`)."""
