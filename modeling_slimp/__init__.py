"""SLIMP: nested multi-modal contrastive learning for skin lesions, as a transformers model.

Importing this package registers SLIMP with the transformers auto classes (AutoConfig, AutoModel,
AutoModelForImageClassification, AutoProcessor), so that `AutoModel.from_pretrained(path)` works without
`trust_remote_code` once it is installed. Importing does nothing else (no I/O, no network).
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoProcessor

from .configuration_slimp import SLIMPConfig, SLIMPLesionMetadataConfig, SLIMPMetadataConfig, SLIMPPatientMetadataConfig
from .modeling_slimp import SLIMPForLesionClassification, SLIMPModel, SLIMPOutput, SLIMPPreTrainedModel
from .pooling import PatientSums
from .processing_slimp import SLIMPProcessor

AutoConfig.register(SLIMPConfig.model_type, SLIMPConfig, exist_ok=True)
AutoConfig.register(SLIMPMetadataConfig.model_type, SLIMPMetadataConfig, exist_ok=True)
AutoModel.register(SLIMPConfig, SLIMPModel, exist_ok=True)
AutoModelForImageClassification.register(SLIMPConfig, SLIMPForLesionClassification, exist_ok=True)
AutoProcessor.register(SLIMPConfig, SLIMPProcessor, exist_ok=True)

__all__ = [
    "SLIMPConfig",
    "SLIMPMetadataConfig",
    "SLIMPLesionMetadataConfig",
    "SLIMPPatientMetadataConfig",
    "SLIMPModel",
    "SLIMPForLesionClassification",
    "SLIMPOutput",
    "SLIMPPreTrainedModel",
    "SLIMPProcessor",
    "PatientSums",
]
