"""Issue 18, the converter's rows: each fault planted as a careful user hit it, and what happens now.

Row numbers are the issue's table: 1 two runs on one folder, 2 --overwrite of a folder holding the inputs,
9 duplicate image files, 10 duplicate CSV columns, 11 1e308 in a numeric column, 12 an HDF5 id naming a
group, 16 disk full / read-only output, 17 leak filter in any case, 18 category spellings, 19 patient_id NA,
21 a multi-class split missing a class.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import h5py
import numpy as np
import pandas as pd
import pytest

from test_prepare_data import convert, isic_rows, jpeg, load_all, write_images, write_isic2024
from training.data import convert as converter
from training.data import shards
from training.data.sources import InputError
from training.safety import MARKER, FolderInUse, FolderLock, OutputError

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def error_line(stderr: str) -> str:
    """The one `error:` line of a failed command (progress bars aside), with no traceback."""
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error")]
    return line


def summary_matches_data(out: Path) -> None:
    """summary.json counts exactly the rows, patients and labels the folder holds."""
    summary = json.loads((out / "summary.json").read_text())
    data = datasets.load_from_disk(str(out))
    for split, counts in summary["splits"].items():
        rows = data[split]
        assert counts["lesions"] == len(rows) and counts["patients"] == len(set(rows["patient_id"]))
        names = rows.features["label"].names
        assert counts["labels"] == {name: rows["label"].count(i) for i, name in enumerate(names)}


# ----- row 1: two runs, one --output-dir -----

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from training.safety import FolderLock
    FolderLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_row1_a_second_run_on_the_same_output_stops_naming_the_first_runs_pid(tmp_path):
    first_csv, first_images = write_isic2024(tmp_path, isic_rows(patients=4))
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # the other run holds the folder
        with pytest.raises(FolderInUse, match=rf"{out}.* in use by another run \(pid {holder.pid}"):
            convert("isic2024", first_csv, first_images, out)
        assert not out.exists() and not (tmp_path / "out.partial").exists()
        result = subprocess.run([sys.executable, "-m", "training.prepare_data", "isic2024", "--metadata", first_csv,
                                 "--images", *first_images, "--output-dir", str(out)], cwd=REPO, env=ENV,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and f"pid {holder.pid}" in error_line(result.stderr)
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: its lock file stays behind
        holder.wait()
    assert (tmp_path / "out.lock").is_file()
    summary = convert("isic2024", first_csv, first_images, out)  # the stale lock of a dead pid is taken over
    assert sum(s["lesions"] for s in summary["splits"].values()) == 12
    assert not (tmp_path / "out.lock").exists()
    summary_matches_data(out)


def test_row1_a_lock_file_naming_a_live_process_is_respected_and_a_dead_ones_is_not(tmp_path):
    metadata, images = write_isic2024(tmp_path, isic_rows(patients=4))
    out = tmp_path / "out"
    import socket

    (tmp_path / "out.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "command": "x"}))
    with pytest.raises(FolderInUse, match=rf"pid {os.getppid()}"):
        convert("isic2024", metadata, images, out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "out.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "x"}))
    convert("isic2024", metadata, images, out)
    summary_matches_data(out)


def test_row1_inputs_changed_during_the_run_are_not_published(tmp_path, monkeypatch):
    metadata, images = write_isic2024(tmp_path, isic_rows(patients=6))
    real = shards.build_split

    def build_then_edit(name, *args):
        if name == "test":  # another process rewrites the CSV while the images are read
            Path(metadata).write_text(Path(metadata).read_text().replace("IP_0000", "IP_9999"))
        return real(name, *args)

    monkeypatch.setattr(shards, "build_split", build_then_edit)
    with pytest.raises(converter.DataError, match="changed while they were converted"):
        convert("isic2024", metadata, images, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_row1_summary_counts_the_rows_held_even_after_image_exclusions_and_a_resume(tmp_path, monkeypatch):
    rows = isic_rows(patients=8)
    images = {r["isic_id"]: jpeg(i) for i, r in enumerate(rows)}
    images[rows[0]["isic_id"]] = b"broken"  # excluded while the images are read, after the split plan
    metadata, store = write_isic2024(tmp_path, rows, images=images)
    real = shards.build_split

    def interrupted(name, *args):
        if name == "validation":
            raise KeyboardInterrupt
        return real(name, *args)

    monkeypatch.setattr(shards, "build_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert("isic2024", metadata, store, tmp_path / "out")
    marker = json.loads((tmp_path / "out.partial" / "train" / "slimp_done.json").read_text())
    assert marker["fingerprint"]  # a finished split says which run built it
    monkeypatch.setattr(shards, "build_split", real)
    summary = convert("isic2024", metadata, store, tmp_path / "out")
    assert sum(s["lesions"] for s in summary["splits"].values()) == len(rows) - 1
    summary_matches_data(tmp_path / "out")


# ----- row 2: --overwrite never deletes what is not ours -----

def test_row2_overwrite_refuses_a_folder_holding_the_inputs_or_not_written_by_the_converter(tmp_path):
    folder = tmp_path / "D"
    folder.mkdir()
    metadata, images = write_isic2024(folder, isic_rows(patients=4))
    (folder / "notes.txt").write_text("mine")
    before = sorted(os.listdir(folder))
    with pytest.raises(OutputError, match=r"--output-dir .*D holds the --metadata file"):
        convert("isic2024", metadata, images, folder, "--overwrite")
    with pytest.raises(OutputError, match=r"--output-dir .* holds the --metadata file"):  # a folder above the inputs
        convert("isic2024", metadata, images, tmp_path, "--overwrite")
    assert sorted(os.listdir(folder)) == before  # nothing deleted

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"without the \.slimp-output\.json marker of a SLIMP dataset: it was not written"):
        convert("isic2024", metadata, images, other, "--overwrite")
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(OutputError, match="--work-dir .* holds files this converter did not write"):
        convert("isic2024", metadata, images, tmp_path / "fresh", "--work-dir", str(other))
    assert (other / "notes.txt").read_text() == "mine"

    ours = tmp_path / "ours"
    convert("isic2024", metadata, images, ours)
    assert json.loads((ours / MARKER).read_text())["kind"] == "dataset"
    summary = convert("isic2024", metadata, images, ours, "--overwrite")  # a dataset it wrote: replaced
    assert sum(s["lesions"] for s in summary["splits"].values()) == 12


def test_row2_an_output_inside_an_image_folder_is_refused(tmp_path):
    metadata, images = write_isic2024(tmp_path, isic_rows(patients=4), store="train-image")
    with pytest.raises(OutputError, match=r"--output-dir .*out is inside the --images"):
        convert("isic2024", metadata, images, Path(images[0]) / "out")


# ----- row 9: duplicate image files -----

def write_ham(tmp_path: Path, patients: int = 6) -> tuple[str, list[dict]]:
    rows = [{"lesion_id": f"HAM_{i // 2:07d}", "image_id": f"ISIC_{i:07d}", "dx": ["nv", "mel", "bkl"][i % 3],
             "dx_type": "histo", "age": 45.0, "sex": "male", "localization": "back"} for i in range(2 * patients)]
    pd.DataFrame(rows).to_csv(tmp_path / "HAM10000_metadata.csv", index=False)
    return str(tmp_path / "HAM10000_metadata.csv"), rows


def test_row9_an_id_naming_two_different_image_files_is_excluded_naming_both(tmp_path):
    metadata, rows = write_ham(tmp_path)
    write_images({r["image_id"]: jpeg(i) for i, r in enumerate(rows)}, tmp_path / "part_1")
    (tmp_path / "part_2").mkdir()
    (tmp_path / "part_2" / "ISIC_0000001.jpg").write_bytes(jpeg(50))  # the same name, other bytes
    (tmp_path / "part_1" / "ISIC_0000002.png").write_bytes(jpeg(51, "PNG"))  # x.jpg beside x.png
    (tmp_path / "part_2" / "ISIC_0000003.jpg").write_bytes(jpeg(3))  # an identical copy: harmless
    summary = convert("ham10000", metadata, [str(tmp_path / "part_1"), str(tmp_path / "part_2")], tmp_path / "out")
    excluded = {entry["id"]: entry for entry in summary["excluded"]}
    assert set(excluded) == {"ISIC_0000001", "ISIC_0000002"}
    assert all(entry["reason"] == "duplicate image" for entry in excluded.values())
    assert "part_1/ISIC_0000001.jpg" in excluded["ISIC_0000001"]["detail"]
    assert "part_2/ISIC_0000001.jpg" in excluded["ISIC_0000001"]["detail"]
    assert "ISIC_0000002.jpg" in excluded["ISIC_0000002"]["detail"] and "ISIC_0000002.png" in excluded["ISIC_0000002"]["detail"]
    assert summary["excluded_counts"] == {"duplicate image": 2}
    assert "ISIC_0000003" in set(load_all(tmp_path / "out")["image_id"])


# ----- row 10: a column name twice -----

def test_row10_a_repeated_column_is_read_once_when_its_copies_agree_and_refused_when_they_differ(tmp_path, capsys):
    frame = pd.DataFrame(isic_rows(patients=4))
    same = pd.concat([frame, frame[["age_approx"]]], axis=1)  # age_approx twice, same values
    same.to_csv(tmp_path / "same.csv", index=False)
    images = write_images({r["isic_id"]: jpeg(i) for i, r in enumerate(isic_rows(patients=4))}, tmp_path / "img.hdf5")
    summary = convert("isic2024", str(tmp_path / "same.csv"), images, tmp_path / "out")
    assert summary["duplicate_columns"] == {"age_approx": [4, len(same.columns)]}
    assert any("'age_approx' appears 2 times" in warning for warning in summary["warnings"])
    assert "age_approx.1" not in load_all(tmp_path / "out").columns

    differ = pd.concat([frame, frame[["patient_id"]].assign(patient_id=lambda f: f["patient_id"].str.lower())], axis=1)
    differ.to_csv(tmp_path / "differ.csv", index=False)
    with pytest.raises(InputError, match=r"column 'patient_id' appears 2 times with different values \(line 2: "
                                         r"'IP_0000' vs 'ip_0000'\)"):
        convert("isic2024", str(tmp_path / "differ.csv"), images, tmp_path / "out2")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        converter.cli(["isic2024", "--metadata", str(tmp_path / "differ.csv"), "--images", *images,
                       "--output-dir", str(tmp_path / "out3")])
    assert "'patient_id' appears 2 times" in error_line(capsys.readouterr().err) and not (tmp_path / "out3").exists()


# ----- row 11: numbers beyond float32 -----

def test_row11_huge_and_infinite_numbers_are_counted_by_id_and_never_stored(tmp_path):
    from training.presets import build_slimp_config

    rows = isic_rows(patients=6)
    rows[0]["tbp_lv_A"], rows[4]["tbp_lv_A"], rows[7]["clin_size_long_diam_mm"] = "1e308", "-1e308", "inf"
    metadata, images = write_isic2024(tmp_path, rows)
    summary = convert("isic2024", metadata, images, tmp_path / "out", "--validation-fraction", "0", "--test-fraction", "0")
    unparsed = summary["unparsed_values"]
    assert unparsed["tbp_lv_A"]["count"] == 2 and unparsed["clin_size_long_diam_mm"]["count"] == 1
    assert {e["id"] for e in unparsed["tbp_lv_A"]["examples"]} == {rows[0]["isic_id"], rows[4]["isic_id"]}
    assert {e["value"] for e in unparsed["tbp_lv_A"]["examples"]} == {"1e308", "-1e308"}
    train = datasets.load_from_disk(str(tmp_path / "out"))["train"]
    values = dict(zip(train["image_id"], train["tbp_lv_A"]))
    assert np.isnan(values[rows[0]["isic_id"]]) and np.isfinite([v for k, v in values.items() if k != rows[0]["isic_id"]
                                                                 and k != rows[4]["isic_id"]]).all()
    schema = json.loads((tmp_path / "out" / "schema.json").read_text())
    config = build_slimp_config(schema, train)  # used to fail: "numerical_mean must be finite"
    assert all(np.isfinite(config.lesion_metadata_config.numerical_mean))


# ----- row 12: an HDF5 id naming a group -----

def test_row12_an_hdf5_id_naming_a_group_is_an_excluded_row_not_a_type_error(tmp_path):
    rows = isic_rows(patients=4)
    pd.DataFrame(rows).to_csv(tmp_path / "meta.csv", index=False)
    with h5py.File(tmp_path / "img.hdf5", "w") as handle:
        for i, row in enumerate(rows[1:], start=1):
            handle.create_dataset(row["isic_id"], data=np.bytes_(jpeg(i)))
        handle.create_group(rows[0]["isic_id"]).create_dataset("pixels", data=np.zeros(3))
    summary = convert("isic2024", str(tmp_path / "meta.csv"), [str(tmp_path / "img.hdf5")], tmp_path / "out")
    [entry] = summary["excluded"]
    assert entry["id"] == rows[0]["isic_id"] and entry["reason"] == "corrupt image"
    assert "is an HDF5 group, not a dataset of image bytes" in entry["detail"]


# ----- row 16: disk full, read-only output -----

@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on the device"),
                                         (errno.EROFS, "the file system is read-only")])
def test_row16_a_full_disk_or_read_only_output_is_one_error_line_and_a_rerun_resumes(tmp_path, monkeypatch, capsys,
                                                                                     code, words):
    metadata, images = write_isic2024(tmp_path, isic_rows(patients=8))
    argv = ["isic2024", "--metadata", metadata, "--images", *images, "--output-dir", str(tmp_path / "out")]
    real = shards.ShardWriter.write

    def write(self, batch, size):
        if self.folder.name == "validation.tmp":
            raise OSError(code, os.strerror(code), str(self.folder / "shard-00000.arrow"))
        return real(self, batch, size)

    monkeypatch.setattr(shards.ShardWriter, "write", write)
    with pytest.raises(SystemExit) as exit_info:
        converter.cli(argv)
    err = error_line(capsys.readouterr().err)
    assert exit_info.value.code == 2 and "validation.tmp/shard-00000.arrow" in err and words in err
    assert (tmp_path / "out.partial" / "train" / "slimp_done.json").is_file()  # finished work kept
    monkeypatch.setattr(shards.ShardWriter, "write", real)  # space freed: the same command resumes
    summary = converter.main(argv)
    assert sum(s["lesions"] for s in summary["splits"].values()) == 24
    summary_matches_data(tmp_path / "out")


# ----- row 17: the leak filter ignores case -----

def test_row17_leaking_columns_in_another_case_are_dropped(tmp_path):
    rows = [dict(r, Target=r["target"], IDDX_1="Malignant" if r["target"] else "Benign", Mel_Thick_MM="",
                 Label="x") for r in isic_rows(patients=4)]
    metadata, images = write_isic2024(tmp_path, rows)
    convert("isic2024", metadata, images, tmp_path / "out")
    schema = json.loads((tmp_path / "out" / "schema.json").read_text())
    columns = set(load_all(tmp_path / "out").columns)
    assert {"Target", "IDDX_1"} <= set(schema["excluded_columns"]) and not {"Target", "IDDX_1", "Label"} & columns
    assert not {"Target", "IDDX_1"} & set(schema["extra_columns"])


# ----- row 18: category spellings -----

def test_row18_category_spellings_are_one_category_in_the_dataset(tmp_path):
    rows = isic_rows(patients=6)
    spellings = ["Male", " MALE ", "male", "female", "FEMALE", " Female"]
    sites = ["Head/Neck", "head/neck", "HEAD/NECK ", "posterior  torso", "Posterior Torso", "posterior torso"]
    for i, row in enumerate(rows):
        row["sex"], row["anatom_site_general"] = spellings[i // 3], sites[i // 3]
    metadata, images = write_isic2024(tmp_path, rows)
    convert("isic2024", metadata, images, tmp_path / "out")
    frame = load_all(tmp_path / "out")
    assert set(frame["sex"]) == {"male", "female"}  # the release vocabulary's spelling
    assert set(frame["anatom_site_general"]) == {"head/neck", "posterior torso"}


# ----- row 19: patient_id NA -----

def test_row19_a_patient_id_spelled_na_is_a_patient_and_is_reported(tmp_path):
    rows = isic_rows(patients=4)
    for row in rows[:3]:
        row["patient_id"] = "NA"
    metadata, images = write_isic2024(tmp_path, rows)
    summary = convert("isic2024", metadata, images, tmp_path / "out")
    assert summary["excluded"] == []
    frame = load_all(tmp_path / "out")
    assert (frame["patient_id"] == "NA").sum() == 3 and frame.loc[frame["patient_id"] == "NA", "split"].nunique() == 1
    assert any("patient_id 'NA' (3 row(s)) is spelled like a missing value; it is kept" in w for w in summary["warnings"])
    rows[3]["patient_id"] = "  "  # blank: missing, as before
    metadata, images = write_isic2024(tmp_path, rows)
    summary = convert("isic2024", metadata, images, tmp_path / "out2")
    assert [(e["id"], e["reason"]) for e in summary["excluded"]] == [(rows[3]["isic_id"], "no patient_id")]


# ----- row 21: a multi-class split without a class -----

def test_row21_a_multiclass_split_missing_a_class_is_reported(tmp_path):
    metadata, rows = write_ham(tmp_path, patients=9)  # classes nv, mel, bkl only: akiec, bcc, df, vasc absent
    write_images({r["image_id"]: jpeg(i) for i, r in enumerate(rows)}, tmp_path / "images")
    summary = convert("ham10000", metadata, [str(tmp_path / "images")], tmp_path / "out")
    warnings = "\n".join(summary["warnings"])
    for split in ("train", "validation", "test"):
        assert f"split '{split}' has no lesion of class 'akiec', 'bcc', 'df'" in warnings
