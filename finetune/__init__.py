"""Fine-tuning stage: data readers, losses and the accelerate trainer that makes specialist checkpoints."""
