"""Checks of what a user hands SLIMP: a batch of inputs, and a checkpoint folder to load.

A wrong input is a `ValueError` that names it and what was expected, never a raw shape error deep in a tower
or a silently wrong answer. Shape and dtype checks always run; the checks that read tensor values back to the
host (patient indices in range, every patient row used, finite pixels) run in eager mode only, so that
`torch.compile(fullgraph=True)` and `torch.export` trace the same forward.

Torch, transformers and the standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import PreTrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Above this many lesions in one forward with `return_loss=True`, the (N, N) logits and their gradients dominate
# memory and time (20,000 lesions: ~10 GB and minutes on a CPU): `forward` warns and points at smaller batches.
LARGE_LOSS_BATCH = 8192


def is_tracing() -> bool:
    """True under `torch.compile`, `torch.export` and `torch.jit.trace`: value checks are skipped there."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def metadata_rows(numerical: torch.Tensor | None, categorical: torch.Tensor | None) -> int | None:
    """The number of rows of a metadata input pair, None when both are absent."""
    for tensor in (numerical, categorical):
        if tensor is not None:
            return tensor.shape[0]
    return None


def check_pixel_values(pixel_values: torch.Tensor, name: str = "pixel_values") -> None:
    """A (N, 3, H, W) float tensor with N >= 1 and, in eager mode, finite values (a NaN pixel would make that
    lesion's embeddings and its whole patient's phenotype NaN)."""
    if not torch.is_tensor(pixel_values) or pixel_values.ndim != 4:
        shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
        raise ValueError(f"{name} must be a (N, 3, H, W) tensor of images, got {shape}; a single image needs a batch "
                         "dimension (pixel_values[None]).")
    if pixel_values.shape[0] == 0:
        raise ValueError(f"{name} holds no image (N = 0); give at least one lesion.")
    if not pixel_values.is_floating_point():
        raise ValueError(f"{name} has dtype {pixel_values.dtype}: the model takes normalised float images. Run raw "
                         "images through SLIMPProcessor (or its image processor) first.")
    if is_tracing():
        return
    finite = torch.isfinite(pixel_values).flatten(1).all(dim=1)  # (N,)
    if not bool(finite.all()):
        lesions = torch.nonzero(~finite).flatten()
        raise ValueError(f"{name} of lesion(s) {lesions[:10].tolist()} (of {pixel_values.shape[0]}) hold NaN or inf: "
                         "check those images and their preprocessing (e.g. a division by a zero std).")


def output_flags(config, output_attentions, output_hidden_states, return_dict) -> tuple:
    """A forward's `(output_attentions, output_hidden_states, return_dict)`, each defaulting to the config's."""
    return (output_attentions if output_attentions is not None else config.output_attentions,
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states,
            return_dict if return_dict is not None else config.return_dict)


def check_metadata(name: str, tensor: torch.Tensor | None, rows: int, columns: int, what: str, floating: bool) -> None:
    """`tensor`, when given, has one row per `what` and one column per feature of the schema."""
    if tensor is None:
        return
    if tensor.ndim != 2 or tensor.shape[0] != rows or tensor.shape[1] != columns:
        raise ValueError(f"{name} must have shape ({rows}, {columns}): one row per {what} and one column per feature "
                         f"of the config's schema, got {tuple(tensor.shape)}.")
    if not floating and tensor.is_floating_point():
        raise ValueError(f"{name} must hold integer category ids (0 = missing), got dtype {tensor.dtype}.")


def resolve_patients(patient_index: torch.Tensor | None, num_patients: int | None, num_lesions: int,
                     device) -> tuple[torch.Tensor, int]:
    """Validated `(patient_index (N,) long, P)`. Without `patient_index` every lesion is its own patient.

    `num_patients` is the number of patient metadata rows, when given; otherwise P = max index + 1 (read back
    from the tensor; under `torch.export` a size known at run time). Raises ValueError naming `patient_index`
    for a wrong shape or dtype and, in eager mode, for an index outside [0, P) or a patient row that no lesion
    points to (its phenotype would be empty).
    """
    if patient_index is None:
        if num_patients is not None and num_patients != num_lesions:
            raise ValueError(f"patient metadata has {num_patients} rows but no patient_index maps the {num_lesions} "
                             "lesions to them; give patient_index (N,) with values in [0, P).")
        return torch.arange(num_lesions, device=device), num_lesions
    if not torch.is_tensor(patient_index) or patient_index.ndim != 1 or patient_index.shape[0] != num_lesions:
        shape = tuple(patient_index.shape) if torch.is_tensor(patient_index) else type(patient_index).__name__
        raise ValueError(f"patient_index must have shape ({num_lesions},), one entry per lesion, got {shape}.")
    if patient_index.is_floating_point() or patient_index.dtype == torch.bool:
        raise ValueError(f"patient_index must hold integer patient indices, got dtype {patient_index.dtype}.")
    patient_index = patient_index.long()
    if num_patients is None:  # P from the indices: one host sync more
        if torch.compiler.is_exporting():  # a size known at run time only, bounded for the tracer
            num_patients = patient_index.max().item() + 1
            torch._check(num_patients >= 1)
            torch._check(num_patients <= num_lesions)
        else:  # a graph break under torch.compile: give the patient rows for fullgraph
            num_patients = int(patient_index.max()) + 1
    if not is_tracing():
        _check_patient_index(patient_index, num_patients)
    return patient_index, num_patients


def _check_patient_index(patient_index: torch.Tensor, num_patients: int) -> None:
    rows = patient_index.clamp(0, max(num_patients - 1, 0))
    hits = torch.zeros(num_patients, device=patient_index.device).index_add(
        0, rows, torch.ones(patient_index.shape[0], device=patient_index.device))  # (P,) lesions per patient row
    # One host sync for the three checks.
    low, high, empty = (int(v) for v in torch.stack([patient_index.min(), patient_index.max(), (hits == 0).sum()]).tolist())
    if low < 0 or high >= num_patients:
        raise ValueError(f"patient_index must lie in [0, {num_patients}) (P = {num_patients} patient rows), got values "
                         f"from {low} to {high}.")
    if empty:
        rows = torch.nonzero(hits == 0).flatten()[:5].tolist()
        raise ValueError(f"patient rows {rows} have no lesion in patient_index: every patient row needs at least one "
                         "lesion (its phenotype is the pool of its lesions); leave such patients out of the batch.")


def check_batch(config, pixel_values, lesion_numerical_values=None, lesion_categorical_ids=None,
                patient_numerical_values=None, patient_categorical_ids=None, patient_index=None) -> tuple[torch.Tensor, int]:
    """Validate a batch of a SLIMP model with `config` (the README's input table); returns `(patient_index, P)`."""
    check_pixel_values(pixel_values)
    num_lesions = pixel_values.shape[0]
    lesion, patient = config.lesion_metadata_config, config.patient_metadata_config
    check_metadata("lesion_numerical_values", lesion_numerical_values, num_lesions, lesion.num_numerical, "lesion", True)
    check_metadata("lesion_categorical_ids", lesion_categorical_ids, num_lesions, lesion.num_categorical, "lesion", False)
    num_patients = metadata_rows(patient_numerical_values, patient_categorical_ids)
    if patient_numerical_values is not None and patient_categorical_ids is not None \
            and patient_numerical_values.shape[0] != patient_categorical_ids.shape[0]:
        raise ValueError(f"patient_numerical_values has {patient_numerical_values.shape[0]} rows but "
                         f"patient_categorical_ids has {patient_categorical_ids.shape[0]}: one row per patient in both.")
    patient_index, num_patients = resolve_patients(patient_index, num_patients, num_lesions, pixel_values.device)
    check_metadata("patient_numerical_values", patient_numerical_values, num_patients, patient.num_numerical, "patient", True)
    check_metadata("patient_categorical_ids", patient_categorical_ids, num_patients, patient.num_categorical, "patient", False)
    return patient_index, num_patients


def missing_metadata(num_numerical: int, num_categorical: int, rows: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """All-missing metadata for `rows` items: (rows, Fn) NaN and (rows, Fc) zeros."""
    numerical = torch.full((rows, num_numerical), float("nan"), device=device)
    categorical = torch.zeros((rows, num_categorical), dtype=torch.long, device=device)
    return numerical, categorical


# ----- checkpoints -----
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def check_checkpoint(path, model_type: str, class_name: str, kwargs: dict) -> None:
    """Refuse a checkpoint of another architecture (its weights would leave the SLIMP towers random), and warn
    when its code files differ from the code running now (the installed package runs, not the checkpoint's).

    `kwargs` are `from_pretrained`'s; a folder or repository without a readable `config.json` is left to
    `from_pretrained` to report.
    """
    hub = {key: kwargs[key] for key in HUB_KWARGS if kwargs.get(key) is not None}
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(path, **hub)
    except (OSError, ValueError):
        return
    found = config_dict.get("model_type")
    if found != model_type:
        architectures = ", ".join(config_dict.get("architectures") or []) or "no architectures listed"
        raise ValueError(
            f"'{path}' holds a '{found}' checkpoint ({architectures}), not a SLIMP one: {class_name}.from_pretrained "
            "would keep none of its weights in the right place. To start SLIMP's image tower from a vision "
            f"checkpoint, use SLIMPModel.from_vision_pretrained('{path}').")
    differences = code_differences(path, hub.get("subfolder", "")) if os.path.isdir(path) else []
    if differences:
        logger.warning(
            f"The code files of '{path}' differ from the SLIMP code running now ({Path(__file__).parent}): "
            f"{'; '.join(differences)}. The running code builds the model (an imported modeling_slimp package "
            "registers SLIMP with the auto classes, which then take precedence over the checkpoint's code, even with "
            "trust_remote_code=True). To run the checkpoint's own code, load it in a process that does not import "
            "modeling_slimp; to make them agree, save the checkpoint again with the running code.")


def code_differences(path, subfolder: str = "") -> list[str]:
    """'file (first difference at line k)' for each `.py` file of a local checkpoint folder that differs from the
    running code's file of the same name (a Hub id is not compared: its code is fetched only with
    trust_remote_code, into transformers' module cache)."""
    folder, running = Path(path, subfolder), Path(__file__).parent
    if not folder.is_dir():
        return []
    differences = []
    for theirs_path in sorted(folder.glob("*.py")):
        ours_path = running / theirs_path.name
        if theirs_path.name == "__init__.py" or not ours_path.is_file():
            continue
        try:
            theirs, ours = theirs_path.read_text().splitlines(), ours_path.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        if theirs != ours:
            line = next((i for i, (a, b) in enumerate(zip(theirs, ours), 1) if a != b), min(len(theirs), len(ours)) + 1)
            differences.append(f"{theirs_path.name} (first difference at line {line})")
    return differences


__all__ = ["LARGE_LOSS_BATCH", "is_tracing", "metadata_rows", "output_flags", "check_pixel_values", "check_metadata",
           "resolve_patients", "check_batch", "missing_metadata", "check_checkpoint", "code_differences"]
