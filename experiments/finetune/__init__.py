"""Fine-tuning the pre-trained 2:4 language models on a downstream classification task."""
