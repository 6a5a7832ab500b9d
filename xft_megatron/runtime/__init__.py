"""The machine the model runs on: torch.distributed and Megatron's parallel state (`parallel`),
the pinned megatron-core and its CPU/gloo support (`compat`), the glibc allocator settings the
command-line entry points choose (`allocator`), the Hugging Face Hub cache (`hub`)."""
