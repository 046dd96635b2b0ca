"""Training: typed configs, the resumable Trainer, and torchrun helpers.

``from mossformer2.training import Trainer, load_train_config``.
"""

from mossformer2.training.config import TrainConfig, load_train_config, save_train_config
from mossformer2.training.trainer import Trainer, TrainState

__all__ = ["TrainConfig", "TrainState", "Trainer", "load_train_config", "save_train_config"]
