"""Reproductions on real data, one package per task (`lm`, `translation`, `vision`) on the shared
training loop, recipes, runner and reports of `experiments.common`."""
