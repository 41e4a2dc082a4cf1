"""Checkpoint folders: contents, both loading routes, and remote code in a process without this package.

One module-scoped fixture builds and saves the checkpoints once; a single fresh subprocess runs every
`trust_remote_code` check.
"""

from __future__ import annotations

import ast
import json
import os
import struct
import subprocess
import sys
import sysconfig

import pandas as pd
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification

from conftest import IMAGE_SIZE, tiny_config
from modeling_slimp import SLIMPForLesionClassification, SLIMPModel, SLIMPProcessor
from training.data.metadata_schema import fit_metadata_schema

PATIENT_IDS = ["IP_SECRET_4711", "IP_SECRET_0815", "IP_SECRET_2024"]
CODE_FILES = ("configuration_slimp.py", "modeling_slimp.py", "metadata_encoder.py", "losses.py")
STDLIB = set(sys.stdlib_module_names)


def training_rows() -> pd.DataFrame:
    return pd.DataFrame({
        "patient_id": [PATIENT_IDS[i] for i in (0, 1, 0, 2, 1, 0)],
        "clin_size_long_diam_mm": [3.1, 5.0, None, 2.2, 7.5, 4.0],
        "tbp_lv_areaMM2": [6.0, 11.0, 4.0, 3.0, 30.0, 9.0],
        "anatom_site_general": ["lower extremity", "head/neck", "lower extremity", None, "posterior torso", "head/neck"],
        "age_approx": [55, 70, 55, 35, 70, 55],
        "sex": ["male", "female", "male", "female", "female", "male"],
    })


def images(count: int, seed: int = 0) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (37 + i, 41, 3), generator=generator, dtype=torch.uint8).numpy())
            for i in range(count)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    rows = training_rows()
    lesion, patient = fit_metadata_schema(
        rows, lesion_numerical=["clin_size_long_diam_mm", "tbp_lv_areaMM2"], lesion_categorical=["anatom_site_general"],
        patient_numerical=["age_approx"], patient_categorical=["sex"],
        lesion_tower=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
        patient_tower=dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2),
        min_patients=1,  # 3 patients, below the default k = 5: this test is about loading, not privacy
    )
    config = tiny_config(lesion_metadata_config=lesion, patient_metadata_config=patient)
    processor = SLIMPProcessor(config=config)
    batch = processor(images=images(len(rows)), metadata=rows)
    torch.manual_seed(0)
    model = SLIMPModel(config).eval()
    with torch.no_grad():
        model.lesion_logit_scale.fill_(2.0)  # not the init value, so a reload that re-initialises would show
    torch.manual_seed(1)
    classifier = SLIMPForLesionClassification(config).eval()
    with torch.no_grad():
        model_out = model(**batch, return_loss=True)
        classifier_logits = classifier(**batch).logits
    model.save_pretrained(root / "model")
    classifier.save_pretrained(root / "classifier")
    processor.save_pretrained(root / "classifier")

    pil_image = images(1, seed=5)[0]
    pil_image.save(root / "lesion.png")
    for index, image in enumerate(images(len(rows))):  # the processor's inputs, for the process without the package
        image.save(root / f"row{index}.png")
    rows.to_json(root / "rows.json", orient="records")
    with torch.no_grad():
        pipeline_probs = classifier(pixel_values=processor(images=[pil_image])["pixel_values"]).logits.softmax(-1)[0]
    torch.manual_seed(2)
    pixel_values = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        reference = {
            "pixel_values": pixel_values,
            "model_image_features": model.get_image_features(pixel_values).pooler_output,
            "classifier_image_features": classifier.slimp.get_image_features(pixel_values).pooler_output,
            "classifier_logits": classifier(pixel_values=pixel_values).logits,
            "pipeline_probs": pipeline_probs,
            "processor_batch": dict(processor(images=[Image.open(root / f"row{i}.png") for i in range(len(rows))],
                                              metadata=pd.read_json(root / "rows.json").to_dict("records"))),
        }
    torch.save(reference, root / "reference.pt")
    return {"root": root, "model": model, "classifier": classifier, "batch": batch, "model_out": model_out,
            "classifier_logits": classifier_logits, "reference": reference}


@pytest.mark.parametrize("folder", ["model", "classifier"])
def test_checkpoint_folder_contents(checkpoints, folder):
    path = checkpoints["root"] / folder
    files = {p.name for p in path.iterdir()}
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_slimp.SLIMPConfig",
        "AutoModel": "modeling_slimp.SLIMPModel",
        "AutoModelForImageClassification": "modeling_slimp.SLIMPForLesionClassification",
    }
    assert config["model_type"] == "slimp"
    assert config["id2label"] == {"0": "nevus", "1": "melanoma", "2": "bcc"}
    assert config["lesion_metadata_config"]["categorical_features"]["anatom_site_general"]
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    raw = (path / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])  # a safetensors header, not a pickle
    assert any(key.endswith("lesion_logit_scale") for key in header)
    for name in CODE_FILES:
        assert name in files, name
        assert _imported_top_level_packages(path / name) <= {"torch", "transformers"} | STDLIB, name


def _imported_top_level_packages(path) -> set[str]:
    packages = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            packages |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:  # relative imports are fine
            packages.add(node.module.split(".")[0])
    return packages


def test_preprocessor_config_names_a_builtin_image_processor(checkpoints):
    path = checkpoints["root"] / "classifier"
    saved = json.loads((path / "preprocessor_config.json").read_text())
    assert "auto_map" not in saved
    assert hasattr(transformers, saved["image_processor_type"])
    image_processor = AutoImageProcessor.from_pretrained(path)
    assert type(image_processor).__module__.startswith("transformers.models.")
    assert image_processor.size == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}


def test_checkpoints_hold_no_patient_id(checkpoints):
    assert checkpoints["batch"]["patient_index"].tolist() == [0, 1, 0, 2, 1, 0]  # grouped by these ids
    files = [p for folder in ("model", "classifier") for p in (checkpoints["root"] / folder).rglob("*") if p.is_file()]
    assert len(files) >= 8
    for path in files:
        content = path.read_bytes()
        for patient_id in PATIENT_IDS:
            assert patient_id.encode() not in content, f"{patient_id} in {path}"


def test_library_route_without_trust_remote_code(checkpoints):
    root, batch = checkpoints["root"], checkpoints["batch"]
    model = AutoModel.from_pretrained(root / "model").eval()
    assert type(model) is SLIMPModel
    with torch.no_grad():
        out = model(**batch, return_loss=True)
    expected = checkpoints["model_out"]
    for name in ("loss", "logits_per_image", "lesion_metadata_embeds", "phenotype_embeds", "patient_metadata_embeds"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name), rtol=0, atol=1e-6, msg=name)

    classifier = AutoModelForImageClassification.from_pretrained(root / "classifier").eval()
    assert type(classifier) is SLIMPForLesionClassification
    with torch.no_grad():
        torch.testing.assert_close(classifier(**batch).logits, checkpoints["classifier_logits"], rtol=0, atol=1e-6)
    base = SLIMPModel.from_pretrained(root / "classifier").eval()  # the base model out of a classifier checkpoint
    pixel_values = checkpoints["reference"]["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(base.get_image_features(pixel_values).pooler_output,
                                   checkpoints["reference"]["classifier_image_features"], rtol=0, atol=1e-6)


def test_processor_loads_from_the_classifier_checkpoint(checkpoints):
    processor = SLIMPProcessor.from_pretrained(checkpoints["root"] / "classifier")
    batch = processor(images=images(6), metadata=training_rows())
    for key, value in checkpoints["batch"].items():
        torch.testing.assert_close(batch[key], value, equal_nan=True, msg=key)


REMOTE_CODE_SCRIPT = r"""
import sys
sys.path.append(sys.argv[1])  # site-packages without its .pth files: no editable finder for this project
root = sys.argv[2]
try:
    import modeling_slimp
    importable = True
except ImportError:
    importable = False
import json
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageClassification, AutoProcessor, pipeline

reference = torch.load(f"{root}/reference.pt")
pixel_values = reference["pixel_values"]
base = AutoModel.from_pretrained(f"{root}/model", trust_remote_code=True).eval()
base_from_classifier = AutoModel.from_pretrained(f"{root}/classifier", trust_remote_code=True).eval()
classifier = AutoModelForImageClassification.from_pretrained(f"{root}/classifier", trust_remote_code=True).eval()
with torch.no_grad():
    results = {
        "modeling_slimp_importable": importable,
        "classes": [type(m).__module__ + "." + type(m).__name__ for m in (base, base_from_classifier, classifier)],
        "model_image_features": base.get_image_features(pixel_values).pooler_output,
        "base_from_classifier_image_features": base_from_classifier.get_image_features(pixel_values).pooler_output,
        "classifier_image_features": classifier.slimp.get_image_features(pixel_values).pooler_output,
        "classifier_logits": classifier(pixel_values=pixel_values).logits,
    }
processor = AutoProcessor.from_pretrained(f"{root}/classifier", trust_remote_code=True)
rows = json.load(open(f"{root}/rows.json"))
results["processor_class"] = type(processor).__module__ + "." + type(processor).__name__
results["processor_batch"] = dict(processor(images=[Image.open(f"{root}/row{i}.png") for i in range(len(rows))], metadata=rows))
with torch.no_grad():
    results["processor_logits"] = classifier(**results["processor_batch"]).logits
classify = pipeline("image-classification", model=f"{root}/classifier", trust_remote_code=True)
results["pipeline"] = classify(Image.open(f"{root}/lesion.png"), top_k=3)
results["modules"] = sorted(name for name in sys.modules if "slimp" in name)
torch.save(results, f"{root}/remote_results.pt")
"""


def test_remote_code_in_a_process_without_the_package(checkpoints):
    root = checkpoints["root"]
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf_home"), HF_MODULES_CACHE=str(root / "hf_modules"))
    site_packages = sysconfig.get_paths()["purelib"]
    completed = subprocess.run(
        [sys.executable, "-S", "-c", REMOTE_CODE_SCRIPT, site_packages, str(root)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = torch.load(root / "remote_results.pt")
    assert results["modeling_slimp_importable"] is False
    assert "modeling_slimp" not in results["modules"]
    assert all(name.startswith("transformers_modules.") for name in results["classes"]), results["classes"]
    assert [name.rsplit(".", 1)[1] for name in results["classes"]] == ["SLIMPModel", "SLIMPModel", "SLIMPForLesionClassification"]

    reference = checkpoints["reference"]
    for key in ("model_image_features", "classifier_image_features", "classifier_logits"):
        torch.testing.assert_close(results[key], reference[key], rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(results["base_from_classifier_image_features"], reference["classifier_image_features"],
                               rtol=0, atol=1e-6)

    # AutoProcessor gives SLIMPProcessor (from the folder's code), metadata and all: the same batch as in-process.
    assert results["processor_class"].startswith("transformers_modules.") and results["processor_class"].endswith(".SLIMPProcessor")
    assert results["processor_batch"].keys() == reference["processor_batch"].keys()
    for key, value in reference["processor_batch"].items():
        torch.testing.assert_close(results["processor_batch"][key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    torch.testing.assert_close(results["processor_logits"], checkpoints["classifier_logits"], rtol=0, atol=1e-5)

    predictions = results["pipeline"]
    id2label = checkpoints["classifier"].config.id2label
    assert sorted(p["label"] for p in predictions) == sorted(id2label.values())
    scores = {p["label"]: p["score"] for p in predictions}
    expected = {id2label[i]: float(p) for i, p in enumerate(reference["pipeline_probs"])}
    for label, score in expected.items():
        assert scores[label] == pytest.approx(score, abs=1e-5), label
