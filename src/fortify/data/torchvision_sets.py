"""Placeholder: torchvision datasets (being written)."""
