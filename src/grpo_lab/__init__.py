"""grpo_lab: GRPO experiments with Hydra, Lightning and MLflow."""

__version__ = "0.1.0"
