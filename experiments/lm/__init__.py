"""The language-model experiments: Shakespeare, a nanoGPT-style GPT-2, the method comparison."""
