"""ISIC 2024 partial AUC above 80% TPR, as a Hugging Face `evaluate` metric module.

Load it by path (works offline) or, once pushed, by its Hub id::

    import evaluate
    pauc = evaluate.load("metrics/isic2024_pauc")
    pauc.compute(references=[0, 1, 0, 1], predictions=[0.1, 0.9, 0.3, 0.6])  # {"pauc": 0.2} (perfect)

The computation lives in ``pauc.py`` next to this file (numpy + scikit-learn only), the same function
the SLIMP training code uses; `evaluate` copies it along with this script.
"""

from __future__ import annotations

import warnings

import datasets
import evaluate

from .pauc import isic2024_pauc, top_k_sensitivity

_DESCRIPTION = """\
Partial area under the ROC curve above a minimum true-positive rate (default 80%), the official
metric of the ISIC 2024 challenge (SLICE-3D, skin cancer detection from 3D total-body photography
crops). It is the area between the ROC curve and the line TPR = min_tpr, so it ranges from 0 to
1 - min_tpr (0.2 by default); a random ranking scores about 0.02 and a perfect one 0.2. Only the
order of the scores matters.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): scores, higher = more likely malignant (e.g. the probability of
        the positive class).
    references (`list` of `int`): binary targets, 1 = malignant.
    min_tpr (`float`, defaults to 0.8): the true-positive-rate threshold.
    patient_ids (`list`, optional): the patient of each lesion; also computes the patient-level metric.
    top_k (`int`, defaults to 15): lesions looked at per patient for the patient-level metric.

Returns:
    pauc (`float`): the partial AUC, in [0, 1 - min_tpr]; NaN, with a warning, if the references hold one class.
    top15_sensitivity (`float`, with patient_ids): over the patients with a malignant lesion, the mean share
        of their malignant lesions among their `top_k` highest-scored lesions (the ISIC 2024 patient metric).
    top15_found_fraction (`float`, with patient_ids): the share of all malignant lesions found that way.

Examples:
    >>> pauc = evaluate.load("metrics/isic2024_pauc")
    >>> result = pauc.compute(references=[0, 0, 1, 1], predictions=[0.1, 0.4, 0.35, 0.8])
    >>> round(result["pauc"], 6)
    0.1
"""

_CITATION = """\
@misc{isic2024challenge,
  title = {ISIC 2024 - Skin Cancer Detection with 3D-TBP},
  author = {Nicholas Kurtansky and Veronica Rotemberg and Maura Gillis and Kivanc Kose and
            Walter Reade and Ashley Chow},
  year = {2024},
  howpublished = {\\url{https://kaggle.com/competitions/isic-2024-challenge}},
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Isic2024Pauc(evaluate.Metric):
    """`evaluate` wrapper of `pauc.isic2024_pauc`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # float64 so that scores distinct in float64 are not tied by a float32 cast.
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int32")}
            ),
            reference_urls=["https://www.kaggle.com/competitions/isic-2024-challenge/overview/evaluation"],
        )

    def _compute(self, predictions: list[float], references: list[int], min_tpr: float = 0.8, patient_ids=None,
                 top_k: int = 15) -> dict:
        classes = sorted(set(int(r) for r in references))
        if len(classes) < 2:
            warnings.warn(f"isic2024_pauc: the references hold one class only ({classes or 'none'}); the partial AUC is "
                          "undefined and returned as NaN. Score a split with both malignant (1) and benign (0) lesions.",
                          UserWarning, stacklevel=2)
        result = {"pauc": isic2024_pauc(references, predictions, min_tpr=min_tpr)}
        if patient_ids is not None:
            patient = top_k_sensitivity(references, predictions, patient_ids, k=top_k)
            result.update({f"top{top_k}_sensitivity": patient["sensitivity"],
                           f"top{top_k}_found_fraction": patient["found_fraction"]})
        return result
