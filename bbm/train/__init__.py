"""Config-driven pretraining on DeepSpeed: ``Trainer(load_config(path, overrides)).train()``."""
from bbm.train.config import TrainConfig, load_config
from bbm.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "load_config"]
