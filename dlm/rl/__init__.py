"""Post-training from rewards (train.mode=rl): estimators of log pi, GRPO, task prompts and rewards, the trainer."""
