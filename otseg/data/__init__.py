"""Dataset facts (class names, zero-shot splits) and, for training, dataset readers."""
