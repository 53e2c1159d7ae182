"""Placeholder: user data from .npz (being written)."""
