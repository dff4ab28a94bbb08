"""Run folders, terminal summaries and Weights & Biases logging (imports wandb)."""
