"""Spanish→English translation (the paper's Table 4, scaled down) with 2:4 sparse feed-forwards."""
