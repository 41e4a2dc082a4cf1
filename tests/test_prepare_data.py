"""Tests of training/prepare_data.py (and training/data/sources.py, training/data/dataset.py) on tiny files in the real layouts."""

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from training.data import convert as prepare_data
from training.data import shards
from training.data.dataset import load_slimp_dataset, read_schema
from training.data.convert import DataError, main, split_patients
from training.data.sources import InputError
from _synthetic_fixtures import TINY_GENERATOR, TINY_SYNTHETIC  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LEAKING = {"target", "iddx_full", "iddx_1", "mel_thick_mm", "mel_mitotic_index", "lesion_id", "biopsed",
           "dx", "dx_type", "diagnostic", "benign_malignant", "diagnosis_1"}


def jpeg(index: int, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (index * 37 % 256, index * 91 % 256, 120)).save(buffer, fmt)
    return buffer.getvalue()


def isic_rows(patients: int = 6, lesions: int = 3) -> list[dict]:
    """ISIC 2024 rows; patient 0's first lesion and patient 1's second are malignant."""
    rows = []
    for p in range(patients):
        for k in range(lesions):
            malignant = (p, k) in {(0, 0), (1, 1)}
            rows.append({"isic_id": f"ISIC_{p}{k:03d}", "target": int(malignant), "patient_id": f"IP_{p:04d}",
                         "age_approx": 40 + 5 * p, "sex": "male" if p % 2 else "female",
                         "anatom_site_general": "posterior torso", "clin_size_long_diam_mm": 3.0 + k,
                         "tbp_tile_type": "3D: XP", "tbp_lv_A": 20.5 + k, "tbp_lv_location": "Torso Back",
                         "attribution": f"clinic {p % 2}", "copyright_license": "CC-BY",
                         "lesion_id": f"IL_{p}{k}" if malignant else "", "iddx_full": "Benign",
                         "iddx_1": "Benign", "mel_thick_mm": 1.2 if malignant else "", "mel_mitotic_index": ""})
    return rows


def write_images(images: dict, store: Path) -> list[str]:
    """`images` (id -> bytes) as Kaggle's HDF5 file if `store` ends in .hdf5, else as <id>.jpg files."""
    if store.suffix == ".hdf5":
        with h5py.File(store, "w") as handle:
            for image_id, data in images.items():
                handle.create_dataset(image_id, data=np.bytes_(data))
    else:
        store.mkdir(parents=True, exist_ok=True)
        for image_id, data in images.items():
            (store / f"{image_id}.jpg").write_bytes(data)
    return [str(store)]


def write_isic2024(tmp_path: Path, rows: list[dict], store: str = "train-image.hdf5", images=None):
    pd.DataFrame(rows).to_csv(tmp_path / "train-metadata.csv", index=False)
    images = images if images is not None else {r["isic_id"]: jpeg(i) for i, r in enumerate(rows)}
    return str(tmp_path / "train-metadata.csv"), write_images(images, tmp_path / store)


def convert(source: str, metadata: str, images: list[str], out: Path, *extra: str) -> dict:
    return main([source, "--metadata", metadata, "--images", *images, "--output-dir", str(out), *extra])


def load_all(out: Path) -> pd.DataFrame:
    """All splits as one frame (without images), with a `split` column; object columns keep None as None."""
    dataset_dict = datasets.load_from_disk(str(out))
    assert set(dataset_dict) == {"train", "validation", "test"}
    columns = [c for c in dataset_dict["train"].column_names if c != "image"]
    frames = [pd.DataFrame({c: pd.Series(dataset_dict[s][c], dtype=object) for c in columns}).assign(split=s)
              for s in dataset_dict]
    return pd.concat(frames, ignore_index=True)


def assert_patient_disjoint(frame: pd.DataFrame) -> None:
    assert (frame.groupby("patient_id")["split"].nunique() == 1).all()


def assert_no_leaks(out: Path) -> dict:
    schema = read_schema(out)
    inputs = {c for level in ("lesion", "patient") for kind in ("numerical", "categorical")
              for c in schema[level][kind]}
    columns = set(datasets.load_from_disk(str(out))["train"].column_names)
    assert not inputs & LEAKING
    assert not columns & (LEAKING | set(schema["excluded_columns"])) - set(schema["extra_columns"])
    return schema


def reasons(summary: dict) -> dict:
    return {entry["id"]: entry["reason"] for entry in summary["excluded"]}


def test_isic2024_hdf5_reports_every_fault_and_keeps_every_good_row(tmp_path):
    rows = isic_rows()
    rows[3]["age_approx"], rows[3]["sex"], rows[3]["tbp_lv_A"] = None, None, None   # NaN metadata: kept
    rows.append(dict(rows[0], age_approx=99))                                        # duplicate of ISIC_0000
    rows.append(dict(rows[1], isic_id="ISIC_NOPATIENT", patient_id=""))              # no patient
    rows.append(dict(rows[1], isic_id="ISIC_CORRUPT"))
    rows.append(dict(rows[1], isic_id="ISIC_MISSING"))
    images = {r["isic_id"]: jpeg(i) for i, r in enumerate(rows) if r["isic_id"] != "ISIC_MISSING"}
    images["ISIC_CORRUPT"] = jpeg(1)[:-2]   # truncated JPEG: the header opens, decoding fails
    metadata, store = write_isic2024(tmp_path, rows, images=images)
    summary = convert("isic2024", metadata, store, tmp_path / "out")

    assert reasons(summary) == {"ISIC_0000": "duplicate id", "ISIC_NOPATIENT": "no patient_id",
                                "ISIC_CORRUPT": "corrupt image", "ISIC_MISSING": "missing image"}
    assert summary["excluded_counts"] == {"duplicate id": 1, "no patient_id": 1, "corrupt image": 1,
                                          "missing image": 1}
    frame = load_all(tmp_path / "out")
    good = [r["isic_id"] for r in isic_rows()]
    assert sorted(frame["image_id"]) == sorted(good)
    assert_patient_disjoint(frame)
    assert sum(s["lesions"] for s in summary["splits"].values()) == len(good)
    assert sum(s["labels"]["malignant"] for s in summary["splits"].values()) == 2
    row = frame.set_index("image_id").loc["ISIC_1000"]
    assert math.isnan(row["age_approx"]) and row["sex"] is None and math.isnan(row["tbp_lv_A"])
    assert frame.set_index("image_id").loc["ISIC_0000", "age_approx"] == 40  # the first occurrence wins
    assert frame.set_index("image_id").loc["ISIC_0000", "label"] == 1
    schema = assert_no_leaks(tmp_path / "out")
    assert schema["patient"] == {"numerical": ["age_approx"], "categorical": ["sex"]}
    assert schema["lesion"]["numerical"] == ["clin_size_long_diam_mm", "tbp_lv_A"]
    assert schema["label"]["names"] == ["benign", "malignant"] and schema["domain_column"] == "attribution"
    assert {"target", "lesion_id", "mel_thick_mm", "iddx_1"} <= set(schema["excluded_columns"])
    train = datasets.load_from_disk(str(tmp_path / "out"))["train"]
    stored = train.cast_column("image", datasets.Image(decode=False))[0]
    assert stored["image"]["bytes"] == images[stored["image_id"]]  # original bytes, not re-encoded
    assert train.features["age_approx"].dtype == "float64" and train.features["sex"].dtype == "string"
    assert "ISIC_CORRUPT" in (tmp_path / "out" / "summary.json").read_text()


def test_isic2024_image_folder_card_and_push(tmp_path, monkeypatch):
    pushed = []
    monkeypatch.setattr(prepare_data, "push_dataset_to_hub", lambda *args, **kwargs: pushed.append(args))
    rows = isic_rows(patients=4)
    metadata, store = write_isic2024(tmp_path, rows, store="train-image")
    summary = convert("isic2024", metadata, store, tmp_path / "out", "--validation-fraction", "0.25",
                      "--test-fraction", "0.25", "--push-to-hub", "someone/slimp-isic2024")
    frame = load_all(tmp_path / "out")
    assert sorted(frame["image_id"]) == sorted(r["isic_id"] for r in rows) and summary["excluded"] == []
    assert_patient_disjoint(frame)
    assert all(summary["splits"][s]["patients"] >= 1 for s in ("train", "validation", "test"))
    assert pushed == [(tmp_path / "out", "someone/slimp-isic2024")]
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nlicense: cc-by-nc-4.0\n") and "SLICE-3D" in card
    counts = summary["splits"]["validation"]
    assert f"| validation | {counts['patients']} | {counts['lesions']} |" in card


def write_isic_archive(tmp_path: Path) -> tuple[str, list[str]]:
    rows = [{"isic_id": f"ISIC_{i:07d}", "patient_id": f"IP_{i // 2}", "lesion_id": f"IL_{i}", "age_approx": 50,
             "sex": "female", "anatom_site_general": "head/neck", "clin_size_long_diam_mm": 4.0,
             "benign_malignant": "malignant" if i % 4 == 0 else "benign", "diagnosis_1": "Benign",
             "diagnosis_2": "Nevus", "attribution": "Hospital", "copyright_license": "CC-BY-NC",
             "pixels_x": 32} for i in range(8)]
    rows[0]["diagnosis_1"] = "Malignant"
    rows[5]["benign_malignant"] = "indeterminate"
    rows[6]["benign_malignant"] = None
    rows[7]["patient_id"] = None
    pd.DataFrame(rows).to_csv(tmp_path / "metadata.csv", index=False)
    write_images({r["isic_id"]: jpeg(i) for i, r in enumerate(rows)}, tmp_path / "images")
    return str(tmp_path / "metadata.csv"), [str(tmp_path / "images")]


def test_isic_archive_binary_and_multiclass_labels(tmp_path):
    metadata, images = write_isic_archive(tmp_path)
    summary = convert("isic-archive", metadata, images, tmp_path / "out")
    assert reasons(summary) == {"ISIC_0000005": "unknown label", "ISIC_0000006": "missing label",
                                "ISIC_0000007": "no patient_id"}
    frame = load_all(tmp_path / "out")
    assert sorted(frame["image_id"]) == [f"ISIC_{i:07d}" for i in range(5)]
    assert_patient_disjoint(frame)
    schema = assert_no_leaks(tmp_path / "out")
    assert schema["lesion"] == {"numerical": ["clin_size_long_diam_mm"], "categorical": ["anatom_site_general"]}
    assert schema["extra_columns"] == ["pixels_x", "copyright_license"] and "diagnosis_2" in schema["excluded_columns"]

    summary = convert("isic-archive", metadata, images, tmp_path / "multi", "--label", "diagnosis_1")
    assert reasons(summary) == {"ISIC_0000007": "no patient_id"}
    assert read_schema(tmp_path / "multi")["label"]["names"] == ["Benign", "Malignant"]
    assert "benign_malignant" not in load_all(tmp_path / "multi").columns


def test_ham10000_groups_by_lesion_across_image_folders(tmp_path):
    dx = ["nv", "nv", "mel", "bkl", "bcc", "nv", "akiec", "df", "vasc", "nv"]
    rows = [{"lesion_id": f"HAM_{i // 2:07d}", "image_id": f"ISIC_{i:07d}", "dx": dx[i], "dx_type": "histo",
             "age": 45.0 if i else None, "sex": "unknown" if i == 1 else "male", "localization": "back"}
            for i in range(10)]
    pd.DataFrame(rows).to_csv(tmp_path / "HAM10000_metadata.csv", index=False)
    write_images({r["image_id"]: jpeg(i) for i, r in enumerate(rows[:5])}, tmp_path / "part_1")
    write_images({r["image_id"]: jpeg(i) for i, r in enumerate(rows[5:])}, tmp_path / "part_2")
    summary = convert("ham10000", str(tmp_path / "HAM10000_metadata.csv"),
                      [str(tmp_path / "part_1"), str(tmp_path / "part_2")], tmp_path / "out")
    frame = load_all(tmp_path / "out")
    assert sorted(frame["image_id"]) == [r["image_id"] for r in rows] and summary["excluded"] == []
    assert set(frame["patient_id"]) == {r["lesion_id"] for r in rows}
    assert_patient_disjoint(frame)
    schema = assert_no_leaks(tmp_path / "out")
    assert schema["label"]["names"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert schema["patient_source_column"] == "lesion_id"
    first_two = frame.set_index("image_id").loc[["ISIC_0000000", "ISIC_0000001"]]
    assert math.isnan(first_two["age"].iloc[0]) and first_two["sex"].iloc[1] is None  # "unknown" is missing


def test_pad_ufes_20_booleans_unk_and_png(tmp_path):
    diagnostic = ["ACK", "BCC", "MEL", "NEV", "SCC", "SEK", "BCC", "ACK"]
    rows = [{"patient_id": f"PAT_{i // 2}", "lesion_id": i, "smoke": ["True", "False", "UNK", ""][i % 4],
             "drink": "False", "background_father": "POMERANIA", "background_mother": "ITALY", "age": 55,
             "pesticide": "False", "gender": "FEMALE", "skin_cancer_history": "True", "cancer_history": "True",
             "has_piped_water": "True", "has_sewage_system": "True", "fitspatrick": 2.0, "region": "FACE",
             "diameter_1": 6.0 if i else "UNK", "diameter_2": 5.0, "diagnostic": diagnostic[i], "itch": "UNK",
             "grew": "True", "hurt": "False", "changed": "False", "bleed": "False", "elevation": "True",
             "img_id": f"PAT_{i // 2}_{i}_{100 + i}.png", "biopsed": "True"} for i in range(8)]
    pd.DataFrame(rows).to_csv(tmp_path / "metadata.csv", index=False)
    (tmp_path / "imgs").mkdir()
    for i, r in enumerate(rows):
        (tmp_path / "imgs" / r["img_id"]).write_bytes(jpeg(i, "PNG"))
    summary = convert("pad-ufes-20", str(tmp_path / "metadata.csv"), [str(tmp_path / "imgs")], tmp_path / "out")
    frame = load_all(tmp_path / "out").set_index("image_id")
    assert sorted(frame.index) == sorted(r["img_id"] for r in rows) and summary["excluded"] == []
    assert [frame.loc[r["img_id"], "smoke"] for r in rows[:4]] == ["True", "False", None, None]
    assert math.isnan(frame.loc[rows[0]["img_id"], "diameter_1"]) and frame.loc[rows[1]["img_id"], "diameter_1"] == 6
    schema = assert_no_leaks(tmp_path / "out")
    assert "biopsed" in schema["excluded_columns"] and schema["extra_columns"] == ["lesion_id"]
    # `itch` is UNK on every row: a column without any value is reported and left out, not an input.
    assert len(schema["patient"]["categorical"]) == 10 and len(schema["lesion"]["categorical"]) == 6
    assert "itch" not in schema["lesion"]["categorical"] and summary["empty_columns"] == ["itch"]


@pytest.mark.parametrize("fault", ["corrupt image", "no patient_id"])
def test_strict_names_the_id_reason_and_file(tmp_path, fault):
    rows = isic_rows(patients=3)
    if fault == "no patient_id":
        rows[4]["patient_id"] = None
    images = {r["isic_id"]: jpeg(i) for i, r in enumerate(rows)}
    if fault == "corrupt image":
        images["ISIC_1001"] = b"not a jpeg"
    metadata, store = write_isic2024(tmp_path, rows, images=images)
    with pytest.raises(DataError) as error:
        convert("isic2024", metadata, store, tmp_path / "out", "--strict")
    expected_file = "train-image.hdf5" if fault == "corrupt image" else "train-metadata.csv"
    assert "ISIC_1001" in str(error.value) and fault in str(error.value) and expected_file in str(error.value)
    assert not (tmp_path / "out").exists()


def test_missing_required_column_names_file_and_column(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "patient_id"} for r in isic_rows(patients=2)]
    metadata, store = write_isic2024(tmp_path, rows)
    with pytest.raises(InputError, match=r"train-metadata\.csv.*'patient_id'"):
        convert("isic2024", metadata, store, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_rerun_refuses_a_non_empty_output_unless_overwrite(tmp_path):
    metadata, store = write_isic2024(tmp_path, isic_rows(patients=3))
    convert("isic2024", metadata, store, tmp_path / "out")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert("isic2024", metadata, store, tmp_path / "out")
    metadata, store = write_isic2024(tmp_path, isic_rows(patients=4))
    summary = convert("isic2024", metadata, store, tmp_path / "out", "--overwrite")
    assert sum(s["patients"] for s in summary["splits"].values()) == 4
    assert len(load_all(tmp_path / "out")) == 12
    assert sorted(os.listdir(tmp_path)) == ["out", "train-image.hdf5", "train-metadata.csv"]  # no leftovers


def test_resume_skips_finished_splits(tmp_path, monkeypatch):
    metadata, store = write_isic2024(tmp_path, isic_rows(patients=10))
    real_build, built = shards.build_split, []

    def failing_build(name, *args):
        if name == "test":
            raise KeyboardInterrupt
        built.append(name)
        return real_build(name, *args)

    monkeypatch.setattr(shards, "build_split", failing_build)
    with pytest.raises(KeyboardInterrupt):
        convert("isic2024", metadata, store, tmp_path / "out")
    assert built == ["train", "validation"] and not (tmp_path / "out").exists()

    monkeypatch.setattr(shards, "build_split", lambda name, *args: built.append(name) or real_build(name, *args))
    summary = convert("isic2024", metadata, store, tmp_path / "out")
    assert built == ["train", "validation", "test"]  # the second run built only the test split
    assert sorted(load_all(tmp_path / "out")["image_id"]) == sorted(r["isic_id"] for r in isic_rows(patients=10))
    assert summary["splits"]["train"]["lesions"] > 0 and not (tmp_path / "out.partial").exists()

    built.clear()  # other options: nothing is reused
    convert("isic2024", metadata, store, tmp_path / "out2", "--work-dir", str(tmp_path / "work"), "--seed", "1")
    assert built == ["train", "validation", "test"]


def test_split_patients_is_disjoint_stratified_and_seeded():
    labels = [1 if p < 10 and k == 0 else 0 for p in range(50) for k in range(3)]
    table = pd.DataFrame({"patient_id": [f"P{p:02d}" for p in range(50) for _ in range(3)], "label": labels})
    split = split_patients(table, validation_fraction=0.2, test_fraction=0.2, seed=0)
    assert (table.assign(split=split).groupby("patient_id")["split"].nunique() == 1).all()
    positive = table.assign(split=split)[table["label"] == 1]["split"].value_counts()
    assert positive.to_dict() == {"train": 6, "validation": 2, "test": 2}
    assert split.value_counts().to_dict() == {"train": 90, "validation": 30, "test": 30}
    assert split.equals(split_patients(table, 0.2, 0.2, seed=0))
    assert not split.equals(split_patients(table, 0.2, 0.2, seed=1))


def test_load_slimp_dataset(tmp_path):
    metadata, store = write_isic2024(tmp_path, isic_rows(patients=5))
    convert("isic2024", metadata, store, tmp_path / "out", "--test-fraction", "0.4", "--validation-fraction", "0")
    train, schema = load_slimp_dataset(tmp_path / "out", "train")
    assert schema["source"] == "isic2024" and isinstance(train, datasets.Dataset)
    assert train[0]["image"].size == (32, 32)
    for split in ("train", "test"):  # converted splits are patient-contiguous: one run of rows per patient
        patients = load_slimp_dataset(tmp_path / "out", split)[0]["patient_id"]
        runs = 1 + sum(a != b for a, b in zip(patients, patients[1:]))
        assert runs == len(set(patients))
    with pytest.raises(KeyError, match="splits: test, train, validation"):
        load_slimp_dataset(tmp_path / "out", "dev")
    with pytest.raises(FileNotFoundError, match="schema.json"):
        read_schema(tmp_path)


@pytest.mark.slow  # a subprocess that builds a dataset, ~10 s
def test_cli_subprocess(tmp_path):
    metadata, store = write_isic2024(tmp_path, isic_rows(patients=3))
    command = [sys.executable, "-m", "training.prepare_data", "isic2024", "--metadata", metadata, "--images",
               *store, "--output-dir", str(tmp_path / "out")]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "train:" in result.stdout and len(load_all(tmp_path / "out")) == 9
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_synthetic_kaggle_layout_end_to_end(tmp_path):
    synthetic = pytest.importorskip("training.data.synthetic")
    counts = synthetic.write_kaggle_layout(tmp_path / "kaggle", 3, seed=0, image_size=64, **TINY_GENERATOR)
    summary = convert("isic2024", str(tmp_path / "kaggle" / "train-metadata.csv"),
                      [str(tmp_path / "kaggle" / "train-image.hdf5")], tmp_path / "out")
    assert sum(s["lesions"] for s in summary["splits"].values()) == counts["lesions"] and not summary["excluded"]
    assert_no_leaks(tmp_path / "out")

    direct = main(["synthetic", *TINY_SYNTHETIC, "--patients", "3", "--seed", "0", "--image-size", "64",
                   "--output-dir", str(tmp_path / "direct")])
    assert direct["splits"] == summary["splits"] and read_schema(tmp_path / "direct")["source"] == "synthetic"
    assert sorted(load_all(tmp_path / "direct")["image_id"]) == sorted(load_all(tmp_path / "out")["image_id"])


def test_hdf5_store_reads_the_same_bytes_across_its_periodic_reopen(tmp_path, monkeypatch):
    from training.data.sources import Hdf5ImageStore, MissingImage

    images = {f"ISIC_{i:03d}": jpeg(i) for i in range(7)}
    (store,) = write_images(images, tmp_path / "train-image.hdf5")
    monkeypatch.setattr(Hdf5ImageStore, "REOPEN_EVERY", 2)
    with Hdf5ImageStore(store) as reader:
        handles = []   # the handles themselves, so that no id is reused
        for image_id, data in list(images.items()) * 2:   # 14 reads: 7 reopens
            assert reader.read(image_id) == data
            if not handles or handles[-1] is not reader._file:
                handles.append(reader._file)
        assert len(handles) == 8   # reopened every 2nd read, and reads went on from the new handle
        with pytest.raises(MissingImage):
            reader.read("ISIC_ABSENT")
