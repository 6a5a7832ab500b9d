"""What the Llama-like families share, and the one table they are registered in.

A family is a subclass of `LlamaLike` decorated with `@register`. Its class attributes name it
(the HF architecture and config.json `model_type`) and state its attention features; the
methods it overrides are where it differs from Llama. Plain data and arithmetic, no torch:
configs are read and validated without loading any model code. A ModelConfig (`m` below) is
read by its fields and never built or imported here: the config layer is above this one and
validates its models with these families.

The tensors of one decoder layer are of two kinds. `attention_tensors` lists those copied as
they are (the norms, the output projection, a family's extras such as q/k norms), per family.
The fused ones are laid out alike in every Llama-like family (q/k/v <-> Megatron's
`linear_qkv`, gate/up <-> `linear_fc1`) and handled by `hf/llama.py`.
"""

from typing import Any, Dict, Optional, Tuple

from xft_megatron.arch import names
from xft_megatron.errors import ConfigError, HFFormatError

Shape = Tuple[int, ...]
TensorNames = Dict[str, Tuple[str, Shape]]  # Megatron name -> (HF name, shape), in a layer

FAMILIES: Dict[str, "LlamaLike"] = {}  # name -> family, in registration order


def register(cls):
    """Class decorator: one instance of the family goes into FAMILIES."""
    family = cls()
    clash = [f.name for f in FAMILIES.values()
             if family.name == f.name or family.model_type == f.model_type]
    if clash:
        raise ValueError(f"family '{family.name}' (model_type '{family.model_type}') clashes "
                         f"with the registered family '{clash[0]}'")
    FAMILIES[family.name] = family
    return cls


def get(name: str) -> "LlamaLike":
    """The family called `name`; ConfigError naming the supported ones otherwise."""
    if name not in FAMILIES:
        raise ConfigError(f"model.family={name!r} is not supported; supported: "
                          f"{', '.join(FAMILIES)}")
    return FAMILIES[name]


def of(m) -> "LlamaLike":
    """The family of a model config (validated when the config was made)."""
    return get(m.family)


def for_model_type(model_type: Any, path: str) -> "LlamaLike":
    """The family of an HF config.json's `model_type` (read from `path`)."""
    for family in FAMILIES.values():
        if family.model_type == model_type:
            return family
    raise HFFormatError(f"{path}: model_type '{model_type}' is not supported; supported: "
                        f"{', '.join(sorted(f.model_type for f in FAMILIES.values()))}")


def for_features(qkv_bias: bool, qk_norm: bool) -> "LlamaLike":
    """The family of a config that names none: the first registered one marked `implied`
    whose attention features these are."""
    for family in FAMILIES.values():
        if family.implied and (family.qkv_bias, family.qk_norm) == (qkv_bias, qk_norm):
            return family
    known = "; ".join(f"{f.name}: {f.describe()}" for f in FAMILIES.values())
    raise ConfigError(f"no supported family has model.qkv_bias={_yaml(qkv_bias)} together "
                      f"with model.qk_norm={_yaml(qk_norm)} ({known})")


def _yaml(value: bool) -> str:
    return str(value).lower()


# config.json fields every Llama-like family must give as integers
REQUIRED_INTS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                 "vocab_size")


def rope(hf: Dict[str, Any], path: str) -> Tuple[float, float]:
    """(theta, linear scaling factor) from either config dialect: transformers 4.x writes
    `rope_theta` and `rope_scaling`, 5.x `rope_parameters`."""
    params = hf.get("rope_parameters")
    scaling = params if params is not None else hf.get("rope_scaling")
    theta = (params or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    if not scaling:
        return float(theta), 1.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), 1.0
    if kind == "linear":
        return float(theta), float(scaling["factor"])
    raise HFFormatError(f"{path}: rope type '{kind}' is not supported (only default and "
                        "linear scaling are implemented exactly)")


class LlamaLike:
    """A pre-norm decoder as HF's Llama writes it: RMSNorm, RoPE, GQA, SwiGLU FFN without
    biases. Subclasses set the names and features below and override where they differ."""

    name = ""  # ModelConfig.family
    hf_architecture = ""  # config.json `architectures[0]` of an export
    model_type = ""  # config.json `model_type` it is recognized by
    qkv_bias = False  # biases on the q, k and v projections (none on o)
    qk_norm = False  # RMSNorm over each head's q and k (weights of size head_dim), before RoPE
    implied = True  # a config naming no family gets this one when the features match
    presets: Dict[str, Dict[str, Any]] = {}  # preset name -> ModelConfig fields

    def features(self) -> Dict[str, bool]:
        """The ModelConfig fields this family fixes."""
        return {"qkv_bias": self.qkv_bias, "qk_norm": self.qk_norm}

    def describe(self) -> str:
        have = [k for k, v in self.features().items() if v]
        return ", ".join(have) if have else "neither"

    def check(self, m) -> None:
        """ConfigError unless `m` has this family's features."""
        for key, want in self.features().items():
            got = getattr(m, key)
            if got != want:
                others = [f.name for f in FAMILIES.values() if f.features()[key] == got]
                alt = f", or set model.family to {' or '.join(others)}" if others else ""
                raise ConfigError(f"model.{key}={_yaml(got)} contradicts model.family="
                                  f"{self.name}, which has {key}={_yaml(want)}: drop model."
                                  f"{key} (the family sets it){alt}")

    # ------------------------------------------------------------ HF config.json -> ModelConfig
    def check_hf(self, hf: Dict[str, Any], path: str) -> None:
        """HFFormatError for what this family's HF model does that is not implemented here
        exactly (overridden per family)."""

    def hf_head_dim(self, hf: Dict[str, Any]) -> Optional[int]:
        """config.json's head width; None: hidden_size / num_attention_heads."""
        return hf.get("head_dim")

    def model_fields(self, hf: Dict[str, Any], path: str) -> Dict[str, Any]:
        """The ModelConfig fields of config.json content `hf` (read from `path`), checked as
        far as the family goes; HFFormatError for anything not implemented exactly (never
        approximated). The caller builds the ModelConfig (hf/files.py: `model_config_from_hf`)
        and reports its ConfigError against `path`."""
        self.check_hf(hf, path)
        if hf.get("hidden_act", "silu") != "silu":
            raise HFFormatError(f"{path}: hidden_act '{hf['hidden_act']}' is not supported "
                                "(SwiGLU with SiLU only)")
        if hf.get("mlp_bias"):
            raise HFFormatError(f"{path}: mlp_bias=true is not supported")
        for key in REQUIRED_INTS:
            if key not in hf:
                raise HFFormatError(f"{path}: required field '{key}' is missing; restore the "
                                    "model's config.json")
            if type(hf[key]) is not int:
                raise HFFormatError(f"{path}: {key}={hf[key]!r} must be an integer; restore "
                                    "the model's config.json")
        heads = hf["num_attention_heads"]
        if heads <= 0:
            raise HFFormatError(f"{path}: num_attention_heads={heads} must be positive; restore "
                                "the model's config.json")
        theta, factor = rope(hf, path)
        return dict(
            family=self.name,
            num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
            ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads", heads),
            head_dim=self.hf_head_dim(hf), vocab_size=hf["vocab_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_theta=theta, rope_scaling_factor=factor,
            norm_eps=hf.get("rms_norm_eps", 1e-6), qkv_bias=self.qkv_bias,
            qk_norm=self.qk_norm, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=hf.get("initializer_range", 0.02),
        )

    # ------------------------------------------------------------ ModelConfig -> config.json
    def hf_config(self, m) -> Dict[str, Any]:
        """config.json content of the HF twin of `m` (subclasses add their own fields)."""
        cfg = {
            "architectures": [self.hf_architecture],
            "model_type": self.model_type,
            "hidden_size": m.hidden_size,
            "intermediate_size": m.ffn_hidden_size,
            "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.num_query_groups,
            "head_dim": m.head_dim,
            "vocab_size": m.vocab_size,
            "max_position_embeddings": m.max_position_embeddings,
            "rms_norm_eps": m.norm_eps,
            "rope_theta": m.rope_theta,
            "tie_word_embeddings": m.tie_embeddings,
            "hidden_act": "silu",
            "initializer_range": m.init_std,
            "use_cache": True,
        }
        if m.rope_scaling_factor != 1.0:
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": m.rope_scaling_factor}
        return cfg

    # ------------------------------------------------------------ tensors
    def attention_tensors(self, m) -> TensorNames:
        """The tensors of one decoder layer copied as they are, Megatron name -> (HF name, HF
        shape), both relative to the layer (`names.layer(i)`, `model.layers.{i}.`)."""
        h, q = m.hidden_size, m.num_attention_heads * m.head_dim
        return {names.ATTN_NORM: ("input_layernorm.weight", (h,)),
                names.MLP_NORM: ("post_attention_layernorm.weight", (h,)),
                names.PROJ: ("self_attn.o_proj.weight", (h, q))}

    # ------------------------------------------------------------ MoE export (remote code)
    def moe_classes(self) -> Tuple[str, str, str]:
        """(architecture, config class, model_type) of this family's XFT MoE, the classes
        `hf/remote/modeling_xft_moe.py` defines for it."""
        stem = self.hf_architecture[:-len("ForCausalLM")]
        return f"XFT{stem}MoeForCausalLM", f"XFT{stem}MoeConfig", f"xft_moe_{self.name}"
