"""Vision (the paper's Table 5, scaled down): a small ViT with 2:4 sparse MLPs on digits or Fashion-MNIST."""
