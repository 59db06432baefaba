"""Config-driven pretraining on DeepSpeed: ``Trainer(load_config(path, overrides)).train()``."""
from bbm._lazy import lazy_exports

__all__ = ["TrainConfig", "Trainer", "load_config"]
lazy_exports(__name__, {"TrainConfig": "bbm.train.config", "load_config": "bbm.train.config",
                        "Trainer": "bbm.train.trainer"})
