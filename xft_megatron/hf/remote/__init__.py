"""Files this project writes into Hugging Face directories (remote code for transformers).

Each module here is self-contained (imports torch and transformers only): it is copied as is
next to the weights and loaded by `AutoModelForCausalLM.from_pretrained(...,
trust_remote_code=True)`.
"""

import os

MODELING_FILE = os.path.join(os.path.dirname(__file__), "modeling_xft_moe.py")
