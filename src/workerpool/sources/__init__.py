"""Where a model's files come from: local paths and remote URLs."""
