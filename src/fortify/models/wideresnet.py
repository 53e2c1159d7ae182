"""Placeholder: WideResNet (being written)."""
