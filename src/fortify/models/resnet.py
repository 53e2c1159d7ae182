"""Placeholder: PreAct ResNet-18 (being written)."""
