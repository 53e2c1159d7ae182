"""Models from other frameworks (Keras 3, ONNX) in, hardened fortify models out.

An external model is wrapped so that it keeps fortify's contracts: it takes inputs in the dataset's
box, channels first, and returns logits. Every attack and metric then runs on it unchanged.
Importing this package imports none of the optional frameworks; each loader imports its own.
"""

from fortify.interop.access import Access, probe_gradients
from fortify.interop.card import InputAdapter, InputCard
from fortify.interop.export import EXPORT_FORMATS, ExportResult, export_model, load_safetensors_export
from fortify.interop.external import BLACK_BOX_ATTACKS, MODEL_SUFFIXES, ExternalModel, load_external_model

__all__ = ["Access", "BLACK_BOX_ATTACKS", "EXPORT_FORMATS", "ExportResult", "ExternalModel", "InputAdapter",
           "InputCard", "MODEL_SUFFIXES", "export_model", "load_external_model", "load_safetensors_export",
           "probe_gradients"]
