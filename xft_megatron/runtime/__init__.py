"""The machine the model runs on: torch.distributed and Megatron's parallel state (`parallel`),
the pinned megatron-core and its CPU/gloo support (`compat`), the CUDA caching allocator's
freed memory (`allocator`), the Hugging Face Hub cache (`hub`)."""
