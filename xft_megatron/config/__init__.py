"""Configuration: small dataclasses per concern (schema.py), loadable from YAML and overridable
as key.sub=value (load.py). This is the package's face; callers import from here:

    from xft_megatron.config import Config, ConfigError, load_config
"""

from xft_megatron.config.load import (MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_CONFIG_NODES,
                                      deep_merge, dump_config, inheritable, load_config,
                                      load_yaml, parse_overrides, read_yaml, require_runnable)
from xft_megatron.config.schema import (FIELDS, LAYER_SPECS, MAX_LAYERS, STAGES,
                                        CheckpointConfig, Config,
                                        DataConfig, ModelConfig, MoEConfig, ParallelConfig,
                                        PrecisionConfig, TrainConfig, config_keys,
                                        model_config_from_dict, upgrade_legacy_keys)
from xft_megatron.errors import ConfigError

__all__ = ["CheckpointConfig", "Config", "ConfigError", "DataConfig", "FIELDS", "LAYER_SPECS",
           "MAX_CONFIG_BYTES", "MAX_CONFIG_DEPTH", "MAX_CONFIG_NODES", "MAX_LAYERS",
           "ModelConfig", "MoEConfig", "ParallelConfig", "PrecisionConfig", "STAGES",
           "TrainConfig", "config_keys", "deep_merge", "dump_config", "inheritable",
           "load_config", "load_yaml", "model_config_from_dict", "parse_overrides", "read_yaml",
           "require_runnable", "upgrade_legacy_keys"]
