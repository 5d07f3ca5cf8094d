"""DPO training on Ray Train: ``TorchTrainer`` workers on cached reference values."""

from dpo_ray.training.trainer import TrainResult, read_metrics, train

__all__ = ["TrainResult", "read_metrics", "train"]
