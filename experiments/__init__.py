"""The language-model experiments: data, model, training and the method comparison."""
