"""Optional frameworks: import them on demand, or say which extra installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from fortify.errors import MissingDependencyError

# which extra of fortify's pyproject.toml brings each optional module
EXTRAS = {"keras": "keras", "onnx": "onnx", "onnx2torch": "onnx", "onnxruntime": "onnx"}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise MissingDependencyError naming the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = EXTRAS[module]
        raise MissingDependencyError(
            f"{purpose} needs the optional package {module!r}, which is not installed ({err}); "
            f"install it with: pip install 'fortify[{extra}]'") from None
