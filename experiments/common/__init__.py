"""What every experiment shares: configs in parts, method recipes, the phase schedule, the one
training loop, metrics records, the multi-run runner, tables and plots, and the command-line syntax."""
