"""The typed config: its sections (pydantic v2), the layer configs, YAML loading with guards, --set, error messages and
the registries of names. Everything downstream takes these objects, never raw dicts."""

from fcclass.config.layers import (
                                   LAYER_CLASSES,
                                   Activation,
                                   AveragePooling2D,
                                   BatchNormalization,
                                   Conv2D,
                                   Dense,
                                   Dropout,
                                   Flatten,
                                   GlobalAveragePooling2D,
                                   LayerBase,
                                   LayerSpec,
                                   MaxPooling2D,
)
from fcclass.config.load import DEFAULT_CONFIG, SHIPPED_CONFIGS, apply_override, config_from_dict, flatten, load_config, resolve_config_path, shipped_configs
from fcclass.config.sections import (
                                   Activation_,
                                   AugmentConfig,
                                   CheckpointConfig,
                                   Config,
                                   DataConfig,
                                   EarlyStoppingConfig,
                                   MlflowConfig,
                                   ModelConfig,
                                   Monitor,
                                   NormalizeStats,
                                   OptimizerConfig,
                                   SchedulerConfig,
                                   TrackingConfig,
                                   TrainConfig,
)

__all__ = [
    "LAYER_CLASSES", "Activation", "AveragePooling2D", "BatchNormalization", "Conv2D", "Dense", "Dropout", "Flatten",
    "GlobalAveragePooling2D", "LayerBase", "LayerSpec", "MaxPooling2D", "Monitor", "Activation_", "ModelConfig",
    "NormalizeStats", "AugmentConfig", "DataConfig", "OptimizerConfig", "SchedulerConfig", "EarlyStoppingConfig",
    "CheckpointConfig", "TrainConfig", "MlflowConfig", "TrackingConfig", "Config", "SHIPPED_CONFIGS",
    "DEFAULT_CONFIG", "shipped_configs", "resolve_config_path", "load_config", "config_from_dict", "apply_override",
    "flatten",
]
