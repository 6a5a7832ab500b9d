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

from xft_megatron.errors import HFFormatError, MissingPackage, UsageError, UserError

DTYPES = ("fp32", "bf16", "fp16")


def gguf_to_hf(gguf_file: str, out: str, dtype: str = "fp32") -> str:
    """Write the HF directory `out` from `gguf_file`; returns `out`."""
    if not os.path.isfile(gguf_file):
        raise FileNotFoundError(f"GGUF file '{gguf_file}' does not exist; give the path of a "
                                ".gguf file")
    if dtype not in DTYPES:
        raise UsageError(f"dtype={dtype!r} must be one of {', '.join(DTYPES)}")
    from xft_megatron.checkpoint.directory import (remove_dead_siblings, require_empty_dir,
                                                   sibling_tmp)
    from xft_megatron.checkpoint.space import free_bytes, human

    require_empty_dir(out)
    with open(gguf_file, "rb") as f:
        if f.read(4) != b"GGUF":
            raise HFFormatError(f"'{gguf_file}' is not a GGUF file (it does not start with "
                                "the bytes 'GGUF'); give the path of a .gguf model file")
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise MissingPackage("reading GGUF needs the `gguf` package (and transformers' GGUF "
                             "reader needs `accelerate`): pip install gguf accelerate, or "
                             "pip install 'xft-megatron[gguf]'") from None
    import torch
    import transformers

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    folder, name = os.path.split(os.path.abspath(gguf_file))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name,
                                                               trust_remote_code=False)
        quantized = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, trust_remote_code=False)
    except (MemoryError, OSError, ImportError):
        raise  # the machine's side, reported as such
    except Exception as e:  # noqa: BLE001 - any parse failure of the reader is the file's
        raise HFFormatError(
            f"'{gguf_file}' could not be read as a GGUF model ({type(e).__name__}: "
            f"{str(e)[:300]}); it may be truncated (compare its size with the source's) or "
            "of an architecture transformers cannot dequantize; download it again or "
            "convert it with llama.cpp's tools") from e
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
    remove_dead_siblings(out)  # what a killed conversion left
    tmp = sibling_tmp(out)
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(out):
            os.rmdir(out)
        os.rename(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise HFWriteError(f"could not write '{out}' ({type(e).__name__}: {str(e)[:300]}; "
                           f"its disk has {human(free_bytes(os.path.dirname(tmp)))} free: is "
                           "it full, or a file-size limit set?). Nothing was left behind; "
                           "free space and run the same command again") from e
    return out


class HFWriteError(UserError, OSError):
    """An HF directory could not be written; its temporary folder was removed."""
