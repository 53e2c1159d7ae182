"""fortify: harden PyTorch classifiers with adversarial training and prove what it bought."""

from __future__ import annotations

from typing import Any

from fortify.errors import FortifyError

__version__ = "0.1.0"

__all__ = ["FortifyError", "ThreatModel", "__version__"]


def __getattr__(name: str) -> Any:
    # ThreatModel imports torch, which takes seconds: the `fortify` command's entry point
    # (fortify.launch) imports this package first and must be able to catch a Ctrl-C during that import
    if name == "ThreatModel":
        from fortify.threat import ThreatModel

        return ThreatModel
    raise AttributeError(f"module 'fortify' has no attribute {name!r}")
