"""fortify: harden PyTorch classifiers with adversarial training and prove what it bought."""

from fortify.errors import FortifyError
from fortify.threat import ThreatModel

__version__ = "0.1.0"

__all__ = ["FortifyError", "ThreatModel", "__version__"]
