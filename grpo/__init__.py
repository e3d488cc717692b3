"""GRPO: advantages, KL estimators, policy losses, the RL trainer, the pipeline and the `grpo` command."""
