"""Hugging Face interop: HF model directories read and checked (`files`), the weight maps of the
Llama-like families and of the XFT MoE (`llama`, `moe`), conversion both ways (`convert`) and
its logit check (`verify`), GGUF files (`gguf`), the special tokens an export carries
(`special_tokens`), and the modeling file shipped inside MoE exports (`remote/`)."""
