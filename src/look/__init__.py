"""LOOK: Leave-One-Out K-Nearest-Neighbour supervised pre-training, and its baselines."""

__version__ = "0.1.0"
