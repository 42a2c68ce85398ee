"""TRAPO (Trust-Region Adaptive Policy Optimization) on PyTorch Lightning."""
