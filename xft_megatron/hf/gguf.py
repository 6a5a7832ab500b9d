"""GGUF file -> plain HF model directory, a thin layer over transformers' own GGUF reader.

transformers dequantizes a GGUF file into a model (`from_pretrained(dir, gguf_file=...)`,
which needs the `gguf` package) but refuses to `save_pretrained` it. Here the dequantized
weights go into a plain model of the same config (the GGUF `quantization_config` dropped) and
that is saved: safetensors, config.json with the special-token ids, generation_config.json,
tokenizer files and chat template. The result is an ordinary HF directory that
`xft convert hf-to-mcore` and `xft upcycle --hf` read. Written into a temporary sibling and
renamed: never half a directory.
"""

import os
import shutil
import uuid

from xft_megatron.errors import UsageError

DTYPES = ("fp32", "bf16", "fp16")


def gguf_to_hf(gguf_file: str, out: str, dtype: str = "fp32") -> str:
    """Write the HF directory `out` from `gguf_file`; returns `out`."""
    if not os.path.isfile(gguf_file):
        raise FileNotFoundError(f"GGUF file '{gguf_file}' does not exist; give the path of a "
                                ".gguf file")
    if dtype not in DTYPES:
        raise UsageError(f"dtype={dtype!r} must be one of {', '.join(DTYPES)}")
    from xft_megatron.checkpoint.directory import require_empty_dir

    require_empty_dir(out)
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise ImportError("reading GGUF needs the `gguf` package: pip install gguf") from None
    import torch
    import transformers

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    folder, name = os.path.split(os.path.abspath(gguf_file))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name,
                                                           trust_remote_code=False)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, trust_remote_code=False)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UsageError(f"'{gguf_file}': the dequantized weights do not fit "
                         f"{type(plain).__name__} (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]})")
    del quantized
    plain = plain.to(torch_dtype)
    plain.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(plain.config, key, getattr(tokenizer, key))
    tmp = f"{out.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(out):
            os.rmdir(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
