"""shelltrain: declarative training of PyTorch image classifiers, configured with Hydra."""

__version__ = "0.1.0"
