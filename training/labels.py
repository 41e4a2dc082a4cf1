"""Which class is the positive one: the class whose score is ranked by the AUROC of a binary problem, the ISIC
2024 pAUC and the top-15 patient metric, and whose probability the demo shows.

    positive_class(["benign", "malignant"])                 # 1: 'malignant' is a malignant name
    positive_class(["melanoma", "nevus"])                   # 0: 'melanoma' is a malignant name
    positive_class(["a", "b"], "b")                         # 1: named by the user
    positive_class(["a", "b"])                              # LabelError: ambiguous, name it
    binary_label_order(["nevus", "melanoma"])               # ['nevus', 'melanoma']: the positive class last (id 1)

The rule: the class the user names (`--positive_label`, a name or a class id); otherwise the one class whose
name is a known malignant diagnosis (`MALIGNANT_NAMES`, case-insensitive; with several, the first of that
list's order: 'malignant', then melanoma, ...). A binary labelling with no such name, or with two, is refused:
sorting the names would make the positive class an accident of the alphabet (melanoma < nevus). A labelling
of more classes without a malignant name keeps class 1, as the converted datasets' own order defines it.
"""

from __future__ import annotations

from collections.abc import Sequence

# Lower-case names of malignant classes, in order of precedence when several are present (HAM10000's 'mel'
# before 'bcc'; PAD-UFES-20's 'MEL' before 'BCC' and 'SCC').
MALIGNANT_NAMES = ("malignant", "melanoma", "mel", "cancer", "positive", "basal cell carcinoma", "bcc",
                   "squamous cell carcinoma", "scc", "akiec")
# Lower-case names that are never the positive class of a binary labelling.
BENIGN_NAMES = ("benign", "nevus", "naevus", "nv", "negative", "healthy", "normal")


class LabelError(ValueError):
    """A labelling whose positive class cannot be told from its names: pass it explicitly."""


def positive_class(label_names: Sequence[str], requested: str | int | None = None) -> int:
    """The id of the positive class of `label_names` (see the module docstring).

    Args:
        label_names: the class names in class-id order.
        requested: the class the user names (a name in `label_names`, or a class id as int or digits), or None.

    Raises:
        LabelError: an unknown `requested`, or a binary labelling without exactly one malignant name.
    """
    names = [str(name) for name in label_names]
    if requested is not None:
        if str(requested) in names:
            return names.index(str(requested))
        if str(requested).isdigit() and int(requested) < len(names):
            return int(requested)
        raise LabelError(f"the positive class '{requested}' is not one of the labels {names} (nor a class id below {len(names)})")
    folded = [name.strip().casefold() for name in names]
    known = [MALIGNANT_NAMES.index(name) for name in folded if name in MALIGNANT_NAMES]
    if len(names) == 2:
        malignant = [i for i, name in enumerate(folded) if name in MALIGNANT_NAMES]
        benign = [i for i, name in enumerate(folded) if name in BENIGN_NAMES]
        if len(malignant) == 1:
            return malignant[0]
        if not malignant and len(benign) == 1:
            return 1 - benign[0]
        if folded in (["0", "1"], ["false", "true"], ["no", "yes"]):
            return 1
        raise LabelError(f"cannot tell the positive class of the labels {names} from their names: name it "
                         f"(--positive_label {names[1]}, or --positive_label {names[0]})")
    if known:
        return folded.index(MALIGNANT_NAMES[min(known)])
    return 1 if len(names) > 1 else 0


def binary_label_order(values: Sequence[str], requested: str | None = None) -> list[str]:
    """The two label values of a binary labelling as class names in id order: the positive class
    (`positive_class`) is class 1, the other class 0."""
    names = sorted({str(value) for value in values})
    if len(names) != 2:
        raise LabelError(f"binary_label_order needs exactly two label values, got {names}")
    positive = positive_class(names, requested)
    return [names[1 - positive], names[positive]]


def describe(label_names: Sequence[str], positive: int) -> str:
    """One line for logs and cards: which class is positive and why it matters."""
    return (f"positive class: '{label_names[positive]}' (class {positive}); the ISIC 2024 pAUC, the top-15 sensitivity "
            f"{'and the AUROC ' if len(label_names) == 2 else ''}rank its score")


__all__ = ["MALIGNANT_NAMES", "BENIGN_NAMES", "LabelError", "positive_class", "binary_label_order", "describe"]
