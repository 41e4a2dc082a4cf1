"""Metadata extrapolation: pseudo-metadata for image-only data from a reference bank (the paper's, arXiv 2505.23709).

    python training/extrapolate.py --model_dir outputs/slimp-synthetic --reference_dir data/synthetic \
        --target_dir data/other --target_split test --output_dir reports/extrapolation --k 5
    python training/extrapolate.py ... --save_bank banks/synthetic-train        # keep the bank (patient data!)
    python training/extrapolate.py --model_dir outputs/slimp-synthetic --bank banks/synthetic-train \
        --reference_dir data/synthetic --target_dir data/other --output_dir reports/extrapolation
    python training/extrapolate.py configs/extrapolate.yaml                     # config-file shortcut

The reference bank holds the SLIMP image embedding and the raw metadata (the model's schema features) of
every lesion of `--reference_dir`/`--reference_split`. Each target lesion gets its `--k` most similar
bank images (cosine similarity of SLIMP image embeddings). Lesion-level features: the mean of the
neighbours' present values (numerical) or their vote (categorical; ties go to the category more frequent
in the bank); `--weighting similarity` weights each neighbour by its similarity. Patient-level features
pool the neighbours of all of a patient's lesions, so a patient gets one value.

Evaluation: the target's own metadata is hidden (its columns are dropped before anything is computed
from the target) and serves only as held-out truth: per numerical feature the MAE against that of
imputing the bank mean, per categorical feature the accuracy against that of the bank's majority
category (patient-level features are scored once per patient). Downstream: logistic-regression probes
trained on the reference `--probe_split` with true metadata, applied to the target with image+metadata
features from (a) true, (b) imputed and (c) no (all missing) metadata, and an image-only probe.
Writes `extrapolation.json` and `extrapolation.md` into `--output_dir`.

The bank is patient-derived data under the reference data's licence: it is kept only with `--save_bank`,
never inside a model folder (a folder holding config.json or model.safetensors, which `push_to_hub`
would publish) unless `--allow_bank_in_model_dir`. Format: `embeddings.safetensors`, `metadata.parquet`,
`bank.json`; no pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch


from modeling_slimp import SLIMPConfig, SLIMPModel, SLIMPProcessor
from modeling_slimp.schema_slimp import as_category, parse_number
from training.arguments import ArgumentError, check_source, parse_dataclasses, run_cli
from training.data.collate import DecodingCollator
from training.data.dataset import column_list, load_slimp_dataset
from training.embeddings import embed_split
from training import labels as label_rules
from training.metrics import probability_metrics
from training.probe import fit_probe, probe_inputs
from training.results import write_json

logger = logging.getLogger(__name__)

BANK_EMBEDDINGS, BANK_METADATA, BANK_INFO = "embeddings.safetensors", "metadata.parquet", "bank.json"
MODEL_FILES = ("config.json", "model.safetensors")
WEIGHTINGS = ("uniform", "similarity")
PATIENT_DATA_WARNING = ("the reference bank holds patient-derived data (image embeddings and raw metadata of %d lesions): "
                        "keep it under the reference data's licence and access rules, and never publish it with a model")


@dataclass
class ExtrapolateArguments:
    model_dir: str = field(metadata={"help": "A saved SLIMPModel folder (its image embeddings drive the neighbour search)."})
    target_dir: str = field(metadata={"help": "The image-only (or to-be-evaluated) dataset."})
    output_dir: str = field(metadata={"help": "Where extrapolation.json and extrapolation.md go."})
    reference_dir: str | None = field(default=None, metadata={"help": "The dataset with metadata (bank source, probe training data)."})
    reference_split: str = field(default="train", metadata={"help": "Split of --reference_dir that forms the bank."})
    bank: str | None = field(default=None, metadata={"help": "A bank saved with --save_bank, used instead of building one."})
    target_split: str = field(default="test", metadata={"help": "Split of --target_dir to impute (its own metadata is hidden, then used as truth)."})
    k: int = field(default=5, metadata={"help": "Neighbours per target lesion."})
    weighting: str = field(default="uniform", metadata={"help": f"One of {WEIGHTINGS}."})
    probe_split: str = field(default="train", metadata={"help": "Reference split the downstream probes train on."})
    seed: int = field(default=0, metadata={"help": "Seed of the downstream probes."})
    probe_C: float = field(default=1.0, metadata={"help": "Inverse L2 strength of the downstream logistic-regression probes."})
    batch_size: int = field(default=256, metadata={"help": "Most lesions per feature-extraction batch (whole patients)."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers of the feature extraction."})
    save_bank: str | None = field(default=None, metadata={"help": "Also write the bank to this folder (patient-derived data)."})
    allow_bank_in_model_dir: bool = field(default=False, metadata={"help": "Allow --save_bank inside a model folder."})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda | ...; default: cuda if available."})


def parse_args(argv: list[str] | None = None) -> ExtrapolateArguments:
    (args,) = parse_dataclasses((ExtrapolateArguments,), argv)
    if args.weighting not in WEIGHTINGS:
        raise ArgumentError(f"--weighting must be one of {WEIGHTINGS}, got '{args.weighting}'")
    if args.k < 1:
        raise ArgumentError(f"--k must be at least 1, got {args.k}")
    if args.reference_dir is None and args.bank is None:
        raise ArgumentError("give --reference_dir (to build the bank) or --bank (a saved one)")
    return args


# ----- the bank -----

@dataclass
class ReferenceBank:
    """Image embeddings (M, D), L2-normalised, and the raw metadata of the same M lesions
    (feature -> M values: float with NaN for numerical features, str or None for categorical ones)."""

    embeddings: np.ndarray
    metadata: dict[str, list]
    info: dict


def schema_features(config: SLIMPConfig) -> dict[str, dict[str, list[str]]]:
    """The model's metadata inputs: {"lesion"|"patient": {"numerical": [...], "categorical": [...]}}."""
    return {level: {"numerical": list(schema.numerical_features), "categorical": list(schema.categorical_features)}
            for level, schema in (("lesion", config.lesion_metadata_config), ("patient", config.patient_metadata_config))}


def _all_features(features: dict) -> list[tuple[str, str, str]]:
    """(level, kind, name) of every schema feature."""
    return [(level, kind, name) for level, kinds in features.items() for kind, names in kinds.items() for name in names]


def _number(value) -> float:
    return parse_number(value)[0]


def column_values(dataset, name: str, kind: str) -> list | None:
    """A metadata column as clean raw values (None if the dataset has no such column)."""
    if name not in dataset.column_names:
        return None
    convert = _number if kind == "numerical" else as_category
    return [convert(value) for value in dataset[name]]


def model_fingerprint(model: SLIMPModel) -> str:
    """sha256 of the weights (sorted names, dtypes, shapes, bytes): a bank is only valid for its model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def check_bank_path(path: str | os.PathLike, allow_in_model_dir: bool = False) -> Path:
    """Refuse a bank folder inside a model folder (one holding config.json or model.safetensors)."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        found = [name for name in MODEL_FILES if (folder / name).is_file()]
        if found:
            if not allow_in_model_dir:
                raise ValueError(f"refusing to write the reference bank to {path}: {folder} holds a model ({', '.join(found)}). "
                                 "The bank is patient-derived data and would be published with the model (push_to_hub "
                                 "uploads the folder). Choose a path outside it, or pass --allow_bank_in_model_dir.")
            logger.warning("writing the reference bank inside the model folder %s (--allow_bank_in_model_dir)", folder)
            break
    if path.is_dir() and any(path.iterdir()) and not (path / BANK_INFO).is_file():
        raise ValueError(f"refusing to write the reference bank to {path}: the folder is not empty and holds no bank")
    return path


def save_bank(bank: ReferenceBank, path: str | os.PathLike, allow_in_model_dir: bool = False) -> Path:
    """Write `embeddings.safetensors`, `metadata.parquet` and `bank.json` (see `check_bank_path`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.numpy import save_file

    path = check_bank_path(path, allow_in_model_dir)
    path.mkdir(parents=True, exist_ok=True)
    logger.warning(PATIENT_DATA_WARNING, len(bank.embeddings))
    save_file({"image_embeds": np.ascontiguousarray(bank.embeddings, dtype=np.float32)}, str(path / BANK_EMBEDDINGS))
    kinds = {name: kind for _, kind, name in _all_features(bank.info["features"])}
    table = pa.table({name: pa.array(values, type=pa.float64() if kinds[name] == "numerical" else pa.string())
                      for name, values in bank.metadata.items()})
    pq.write_table(table, path / BANK_METADATA)
    (path / BANK_INFO).write_text(json.dumps(bank.info, indent=1))
    logger.info("saved the reference bank (%d lesions) to %s", len(bank.embeddings), path)
    return path


def load_bank(path: str | os.PathLike) -> ReferenceBank:
    """Read a bank written by `save_bank` (safetensors + parquet + JSON; nothing is unpickled)."""
    import pyarrow.parquet as pq
    from safetensors.numpy import load_file

    path = Path(path)
    info = json.loads((path / BANK_INFO).read_text())
    embeddings = load_file(str(path / BANK_EMBEDDINGS))["image_embeds"]
    metadata = pq.read_table(path / BANK_METADATA).to_pydict()
    for _, kind, name in _all_features(info["features"]):
        metadata[name] = [_number(v) if kind == "numerical" else as_category(v) for v in metadata[name]]
    logger.warning(PATIENT_DATA_WARNING, len(embeddings))
    return ReferenceBank(embeddings=embeddings, metadata=metadata, info=info)


def build_bank(reference_features: dict[str, np.ndarray], reference, features: dict, info: dict) -> ReferenceBank:
    """Bank of a reference split from its extracted features and its raw metadata columns."""
    metadata = {}
    for _, kind, name in _all_features(features):
        values = column_values(reference, name, kind)
        if values is None:
            logger.warning("reference has no column '%s': the bank holds it as missing", name)
            values = [float("nan") if kind == "numerical" else None] * len(reference)
        metadata[name] = values
    return ReferenceBank(embeddings=reference_features["projection"]["image"].astype(np.float32), metadata=metadata,
                         info={**info, "features": features, "num_lesions": len(reference)})


# ----- neighbours and imputation -----

def nearest_neighbours(query: np.ndarray, gallery: np.ndarray, k: int, chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) indices of the k most cosine-similar gallery rows of each query row, most similar first,
    and their (Q, k) similarities. Memory O(chunk_size x M)."""
    if k > len(gallery):
        raise ValueError(f"k = {k} neighbours but the bank holds {len(gallery)} lesions")
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    query, gallery = unit(query.astype(np.float32)), unit(gallery.astype(np.float32))
    indices, similarities = np.empty((len(query), k), dtype=np.int64), np.empty((len(query), k), dtype=np.float32)
    for start in range(0, len(query), chunk_size):
        sims = query[start : start + chunk_size] @ gallery.T  # (chunk, M)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        indices[start : start + len(sims)] = np.take_along_axis(top, order, axis=1)
        similarities[start : start + len(sims)] = np.take_along_axis(top_sims, order, axis=1)
    return indices, similarities


def impute(bank: ReferenceBank, indices: np.ndarray, similarities: np.ndarray, patient_ids, weighting: str = "uniform"
           ) -> dict[str, list]:
    """Imputed raw metadata of Q target lesions from their bank neighbours (see the module docstring).

    Args:
        indices, similarities: (Q, k) from `nearest_neighbours`.
        patient_ids: (Q,) the target lesions' patients (patient-level features pool over them).

    Returns:
        feature -> Q values (float, NaN where no neighbour has one; str, None where none has one).
    """
    weights = np.ones(indices.shape) if weighting == "uniform" else np.clip(similarities, 1e-6, None).astype(np.float64)
    _, patient_group = np.unique(np.asarray(patient_ids, dtype=str), return_inverse=True)
    groups = {"lesion": np.arange(len(indices)), "patient": patient_group}
    imputed = {}
    for level, kind, name in _all_features(bank.info["features"]):
        pool = _weighted_mean if kind == "numerical" else _weighted_vote
        per_group = pool(bank.metadata[name], indices, weights, groups[level])
        imputed[name] = [per_group[g] for g in groups[level]]
    return imputed


def _weighted_mean(values: list, indices: np.ndarray, weights: np.ndarray, group: np.ndarray) -> list[float]:
    """Per group: the weighted mean of the present values of all its rows' neighbours (NaN if none)."""
    neighbour_values = np.asarray(values, dtype=np.float64)[indices]  # (Q, k)
    present = ~np.isnan(neighbour_values)
    num_groups = int(group.max(initial=-1)) + 1
    totals, mass = np.zeros(num_groups), np.zeros(num_groups)
    np.add.at(totals, group, np.where(present, neighbour_values * weights, 0.0).sum(axis=1))
    np.add.at(mass, group, np.where(present, weights, 0.0).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mass > 0, totals / mass, np.nan).tolist()


def _weighted_vote(values: list, indices: np.ndarray, weights: np.ndarray, group: np.ndarray) -> list[str | None]:
    """Per group: the category with the most neighbour weight (ties: the more frequent in the bank; None if
    no neighbour has one)."""
    vocabulary = _by_frequency(values)
    num_groups = int(group.max(initial=-1)) + 1
    if not vocabulary:
        return [None] * num_groups
    code_of = {category: code for code, category in enumerate(vocabulary)}
    codes = np.asarray([code_of[v] if v is not None else len(vocabulary) for v in values])[indices]  # (Q, k)
    votes = np.zeros((num_groups, len(vocabulary) + 1))  # the last column collects missing values
    np.add.at(votes, (np.repeat(group, indices.shape[1]), codes.ravel()), weights.ravel())
    votes = votes[:, :-1]
    winner = votes.argmax(axis=1)  # the first maximum: vocabulary is ordered by bank frequency
    return [vocabulary[w] if votes[g, w] > 0 else None for g, w in enumerate(winner)]


def _by_frequency(values: list) -> list[str]:
    counts: dict[str, int] = {}
    for value in values:
        if value is not None:
            counts[value] = counts.get(value, 0) + 1
    return sorted(counts, key=lambda c: (-counts[c], c))


# ----- evaluation -----

def _per_patient(values: list, patient_ids) -> list:
    """The first present value of each patient (the processor's rule), in order of first appearance."""
    first: dict = {}
    for patient, value in zip(patient_ids, values):
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        if patient not in first or (first[patient] is None and not missing):
            first[patient] = None if missing else value
    return list(first.values())


def imputation_errors(truth: dict[str, list | None], imputed: dict[str, list], bank: ReferenceBank, patient_ids) -> dict:
    """Per feature: kNN imputation vs the mean / majority baseline, on target rows with a true value."""
    report = {}
    for level, kind, name in _all_features(bank.info["features"]):
        entry = {"level": level, "kind": kind}
        if truth.get(name) is None:
            report[name] = {**entry, "n": 0, "note": "the target has no such column"}
            continue
        true, guess = truth[name], imputed[name]
        if level == "patient":
            true, guess = _per_patient(true, patient_ids), _per_patient(guess, patient_ids)
        if kind == "numerical":
            true, guess = np.asarray(true, dtype=np.float64), np.asarray(guess, dtype=np.float64)
            bank_values = np.asarray(bank.metadata[name], dtype=np.float64)
            baseline = float(np.nanmean(bank_values)) if np.isfinite(bank_values).any() else float("nan")
            scored = ~np.isnan(true) & ~np.isnan(guess)
            entry.update(n=int((~np.isnan(true)).sum()), coverage=_ratio(scored.sum(), (~np.isnan(true)).sum()),
                         mae=_mean(np.abs(guess - true)[scored]), mean_baseline_mae=_mean(np.abs(baseline - true)[scored]),
                         reference_mean=baseline)
        else:
            present = [i for i, v in enumerate(true) if v is not None]
            vocabulary = _by_frequency(bank.metadata[name])
            majority = vocabulary[0] if vocabulary else None
            entry.update(n=len(present), coverage=_ratio(sum(guess[i] is not None for i in present), len(present)),
                         accuracy=_ratio(sum(guess[i] == true[i] for i in present), len(present)),
                         majority_baseline_accuracy=_ratio(sum(majority == true[i] for i in present), len(present)),
                         majority=majority)
        report[name] = entry
    return report


def _ratio(numerator, denominator) -> float:
    return float(numerator) / float(denominator) if denominator else float("nan")


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


def downstream_probes(probe_train: dict[str, np.ndarray], target_variants: dict[str, dict[str, np.ndarray]],
                      num_classes: int, seed: int = 0, C: float = 1.0, positive_class: int = 1) -> dict[str, dict[str, float]]:
    """Probes trained on the reference with true metadata, applied to each target variant
    (`target_variants`: "true" / "imputed" / "missing" metadata -> extracted features); pAUC and top-15 (and a
    binary AUROC) rank `positive_class`."""
    rows = {}
    for feature_set in ("image", "image+metadata"):
        probe = fit_probe(probe_inputs(probe_train, feature_set), probe_train["labels"], seed=seed, C=C)
        variants = {"image only": target_variants["missing"]} if feature_set == "image" else {
            f"image+metadata ({name} metadata)": features for name, features in target_variants.items()}
        for row, features in variants.items():
            scores = probe.predict_proba(probe_inputs(features, feature_set))
            rows[row] = probability_metrics(features["labels"], scores, probe.classes_, num_classes, positive_class)
    return rows


def with_columns(dataset, values: dict[str, list], features: dict):
    """`dataset` with these metadata columns added (numerical as float64 with NaN, categorical as strings)."""
    import datasets

    kinds = {name: kind for _, kind, name in _all_features(features)}
    for name, column in values.items():
        feature = datasets.Value("float64" if kinds[name] == "numerical" else "string")
        dataset = dataset.add_column(name, column, feature=feature)
    return dataset


# ----- report -----

def _number_cell(value, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def render_markdown(result: dict) -> str:
    settings = result["settings"]
    lines = [f"# SLIMP metadata extrapolation: `{settings['target_dir']}` ({settings['target_split']})", "",
             f"Reference bank: {result['bank']['num_lesions']} lesions of `{result['bank'].get('reference_dir')}` "
             f"({result['bank'].get('reference_split')}); model `{settings['model_dir']}`; k = {settings['k']}, "
             f"{settings['weighting']} weighting; {result['target_lesions']} target lesions of {result['target_patients']} patients. "
             "The target's own metadata was hidden and used only as held-out truth.", ""]
    errors = result["imputation"]
    numerical = [(n, e) for n, e in errors.items() if e["kind"] == "numerical"]
    categorical = [(n, e) for n, e in errors.items() if e["kind"] == "categorical"]
    if numerical:
        lines += ["## Numerical features (MAE; patient-level scored per patient)", "",
                  "| feature | level | n | coverage | MAE kNN | MAE mean baseline |", "|---|---|---|---|---|---|"]
        lines += [f"| `{n}` | {e['level']} | {e['n']} | {_number_cell(e.get('coverage'), 2)} | {_number_cell(e.get('mae'))} | "
                  f"{_number_cell(e.get('mean_baseline_mae'))} |" for n, e in numerical]
        lines.append("")
    if categorical:
        lines += ["## Categorical features (accuracy)", "",
                  "| feature | level | n | coverage | accuracy kNN | majority baseline |", "|---|---|---|---|---|---|"]
        lines += [f"| `{n}` | {e['level']} | {e['n']} | {_number_cell(e.get('coverage'), 2)} | {_number_cell(e.get('accuracy'))} | "
                  f"{_number_cell(e.get('majority_baseline_accuracy'))} |" for n, e in categorical]
        lines.append("")
    absent = [n for n, e in errors.items() if e["n"] == 0]
    if absent:
        lines += [f"No held-out truth for: {', '.join(f'`{n}`' for n in absent)}.", ""]
    if result.get("downstream"):
        lines += [f"## Downstream linear probe (trained on the reference `{settings['probe_split']}` split with true metadata)", "",
                  "| target features | AUROC | pAUC (TPR>80%) | balanced acc. |", "|---|---|---|---|"]
        lines += [f"| {row} | {_number_cell(m['auroc'])} | {_number_cell(m['pauc_80tpr'], 4)} | {_number_cell(m['balanced_accuracy'])} |"
                  for row, m in result["downstream"].items()]
    lines += [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


# ----- script -----

def reference_bank(args: ExtrapolateArguments, extract, features: dict, fingerprint: str, cache: dict) -> ReferenceBank:
    """`--bank` loaded and checked against the model, or built from `--reference_dir` (its features go to `cache`)."""
    if args.bank:
        bank = load_bank(args.bank)
        if bank.info.get("model_fingerprint") != fingerprint:
            raise ValueError(f"the bank {args.bank} was built with another model than {args.model_dir} "
                             "(weights fingerprint differs): its embeddings are not comparable; rebuild it.")
        return bank
    reference, reference_schema = load_slimp_dataset(args.reference_dir, args.reference_split)
    cache[args.reference_split] = extract(reference)
    return build_bank(cache[args.reference_split], reference, features,
                      {"reference_dir": args.reference_dir, "reference_split": args.reference_split,
                       "source": reference_schema.get("source"), "license": reference_schema.get("license"),
                       "contents": "patient-derived data: image embeddings and raw metadata of reference lesions",
                       "model_dir": args.model_dir, "model_fingerprint": fingerprint})


def downstream(args: ExtrapolateArguments, extract, cache: dict, target, hidden, imputed: dict, features: dict,
               missing: dict, notes: list[str]) -> dict | None:
    """Probes trained on the reference `--probe_split` with true metadata, applied to the target with true,
    imputed and missing metadata (None, with a note, without a reference or when the label names differ).
    `hidden` is the target without its metadata columns; `missing` its extracted features."""
    if args.reference_dir is None:
        notes.append("no --reference_dir: the downstream probe (trained on the reference) was not run")
        return None
    probe_train, _ = load_slimp_dataset(args.reference_dir, args.probe_split)
    label_names = list(probe_train.features["label"].names)
    if label_names != list(target.features["label"].names):
        notes.append(f"label names differ (reference {label_names}, target {target.features['label'].names}): no downstream probe")
        return None
    try:
        positive = label_rules.positive_class(label_names)
    except label_rules.LabelError:
        positive = 1
        notes.append(f"the labels {label_names} do not tell which class is positive: the probes rank class 1 ('{label_names[1]}')")
    notes.append(f"downstream probes: {label_rules.describe(label_names, positive)}")
    logger.info(notes[-1])
    variants = {"true": extract(target)} if len(hidden.column_names) < len(target.column_names) else {}
    variants.update(imputed=extract(with_columns(hidden, imputed, features)), missing=missing)
    probe_features = cache[args.probe_split] if args.probe_split in cache else extract(probe_train)
    return downstream_probes(probe_features, variants, len(label_names), args.seed, args.probe_C, positive)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    check_source(args.model_dir, "--model_dir", "model")
    for option in ("reference_dir", "target_dir"):
        if getattr(args, option) is not None:
            check_source(getattr(args, option), f"--{option}", "dataset")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.save_bank:
        check_bank_path(args.save_bank, args.allow_bank_in_model_dir)  # refuse before any work
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = SLIMPModel.from_pretrained(args.model_dir).to(device).eval()
    collator = DecodingCollator(SLIMPProcessor.from_pretrained(args.model_dir), train=False)
    features = schema_features(model.config)
    extract = lambda dataset: embed_split(model, dataset, collator, batch_size=args.batch_size,  # noqa: E731
                                          num_workers=args.num_workers, device=device)
    notes: list[str] = []
    cache: dict[str, dict] = {}  # reference split -> its features
    bank = reference_bank(args, extract, features, model_fingerprint(model), cache)
    if args.save_bank:
        save_bank(bank, args.save_bank, args.allow_bank_in_model_dir)
    bank_source = (bank.info.get("reference_dir"), bank.info.get("reference_split"))
    if bank_source[0] and (Path(bank_source[0]).resolve(), bank_source[1]) == (Path(args.target_dir).resolve(), args.target_split):
        notes.append("the target split is the bank's own split: every lesion finds itself (imputation is trivially exact)")
        logger.warning(notes[-1])

    # The target's own metadata is only held-out truth: the imputation sees `hidden`, the target without those columns.
    target, _ = load_slimp_dataset(args.target_dir, args.target_split)
    patient_ids = [str(p) for p in column_list(target, "patient_id")]
    truth = {name: column_values(target, name, kind) for _, kind, name in _all_features(features)}
    hidden = target.remove_columns([name for name, values in truth.items() if values is not None])
    missing = extract(hidden)
    indices, similarities = nearest_neighbours(missing["projection"]["image"], bank.embeddings, args.k)
    imputed = impute(bank, indices, similarities, patient_ids, args.weighting)
    errors = imputation_errors(truth, imputed, bank, patient_ids)

    result = {"settings": asdict(args), "bank": bank.info, "target_lesions": len(target),
              "target_patients": len(set(patient_ids)),
              "neighbour_similarity": {"mean": float(similarities.mean()), "min": float(similarities.min())},
              "imputation": errors, "notes": notes,
              "downstream": downstream(args, extract, cache, target, hidden, imputed, features, missing, notes)}
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "extrapolation.json", result)
    (output / "extrapolation.md").write_text(render_markdown(result))
    logger.info("wrote %s", output / "extrapolation.md")
    return result


if __name__ == "__main__":
    print(Path(run_cli(main)["settings"]["output_dir"], "extrapolation.md").read_text())
