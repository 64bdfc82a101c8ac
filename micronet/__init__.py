"""micronet: compress neural networks and deploy them."""

__version__ = "2.0.0.dev0"
