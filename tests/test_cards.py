"""Every generated card tells the truth: its YAML says what the folder is, and each of its "How to use"
Python blocks runs, in a process where this package is not importable, on the folder it describes. What
gets pushed holds no checkpoint, log, pickle or absolute local path (huggingface_hub's own filter)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from huggingface_hub.utils import filter_repo_objects

from _synthetic_fixtures import TRAIN_FAST, synthetic  # noqa: F401
from training import export_widget, finetune
from training.release import PUSH_IGNORE

PLACEHOLDERS = ("path/to/this/folder", "path/to/the/pre-trained/checkpoint")


def front_matter(card: Path) -> dict:
    return yaml.safe_load(card.read_text().split("---", 2)[1])


def python_blocks(card: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card.read_text(), flags=re.S)


def run_blocks(card: Path, folder: Path, base: Path | None = None) -> str:
    """Run every Python block of `card` in a fresh interpreter without this repository (`python -S`, only
    site-packages), with the card's placeholders replaced by the local folders."""
    outputs = []
    for block in python_blocks(card):
        code = block.replace(PLACEHOLDERS[0], str(folder)).replace(PLACEHOLDERS[1], str(base or folder))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
        env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(folder.parent / "hf_modules"))
        script = f"import sys\nsys.path.append({sysconfig.get_paths()['purelib']!r})\n" + code
        done = subprocess.run([sys.executable, "-S", "-c", script], cwd=folder.parent, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"{card}: a How-to-use block failed:\n{code}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    assert outputs, f"{card} has no Python block"
    return "\n".join(outputs)


@pytest.fixture(scope="module")
def adapter(synthetic, tmp_path_factory) -> Path:  # noqa: F811
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    finetune.main(["--model_dir", synthetic.checkpoint_dir, "--dataset_dir", synthetic.dataset_dir, "--output_dir", str(folder),
                   "--mode", "lora", "--max_steps", "1", *TRAIN_FAST])
    return folder


def test_encoder_card(synthetic):  # noqa: F811
    folder = Path(synthetic.checkpoint_dir)
    meta = front_matter(folder / "README.md")
    assert meta["pipeline_tag"] == "image-feature-extraction" and meta["library_name"] == "transformers"
    assert meta["license"] == "cc-by-4.0" and "datasets" not in meta  # synthetic data; no Hub dataset id
    assert "synthetic" in (folder / "README.md").read_text().lower()
    out = run_blocks(folder / "README.md", folder)
    assert "torch.Size([1, " in out


def test_classifier_card(synthetic):  # noqa: F811
    folder = Path(synthetic.classifier_dir)
    meta = front_matter(folder / "README.md")
    assert meta["pipeline_tag"] == "image-classification" and "base_model" not in meta  # a local base is no Hub id
    out = run_blocks(folder / "README.md", folder)
    assert "'label': 'benign'" in out or "'label': 'malignant'" in out


def training_procedure(card: Path) -> dict:
    section = card.read_text().split("## Training procedure", 1)[1]
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, flags=re.S).group(1))


def test_classifier_cards_say_how_they_were_made_and_score_each_split_under_its_name(adapter, synthetic):  # noqa: F811
    linear = training_procedure(Path(synthetic.classifier_dir) / "README.md")
    assert linear["mode"] == "linear" and linear["base model"] == Path(synthetic.checkpoint_dir).name
    assert linear["training"] == {"seed": linear["training"]["seed"], "fitted": f"logistic regression, C = {linear['probe_C']}"}
    lora = training_procedure(adapter / "README.md")
    assert lora["mode"] == "lora" and lora["lora_r"] == 8 and lora["training"]["max_steps"] == 1
    for card in (Path(synthetic.classifier_dir) / "README.md", adapter / "README.md"):
        text = card.read_text()
        assert "hub_token" not in text and "local_rank" not in text, card
        results = front_matter(card)["model-index"][0]["results"]
        named = {entry["dataset"]["split"]: [m["name"] for m in entry["metrics"]] for entry in results}
        assert set(named) == {"validation", "test"}, named
        assert all(name.startswith("validation") for name in named["validation"])
        assert all(name.startswith("test") for name in named["test"])


def test_lora_adapter_card(adapter, synthetic):  # noqa: F811
    meta = front_matter(adapter / "README.md")
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "image-classification"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "modeling_slimp.py").is_file()
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    card = (adapter / "README.md").read_text()
    assert f'base_id = "{base}"' in card and PLACEHOLDERS[1] not in card  # the real base, not a placeholder
    out = run_blocks(adapter / "README.md", adapter, base=Path(synthetic.checkpoint_dir))
    assert "SLIMPForLesionClassification" in out


def test_widget_card(synthetic, tmp_path):  # noqa: F811
    out_dir = tmp_path / "widget"
    export_widget.main(["--model_dir", synthetic.classifier_dir, "--output_dir", str(out_dir)])
    meta = front_matter(out_dir / "README.md")
    assert meta["license"] == front_matter(Path(synthetic.classifier_dir) / "README.md")["license"] == "cc-by-4.0"
    assert "base_model" not in meta
    assert "'score'" in run_blocks(out_dir / "README.md", out_dir)
    text = " ".join((out_dir / "README.md").read_text().split())
    assert "export** of the SLIMP lesion classifier" in text and " the a " not in text
    assert "Its head was fitted on `image+lesion+patient+context`" in text  # the fixture's linear head reads everything


def test_dataset_card(synthetic):  # noqa: F811
    folder = Path(synthetic.dataset_dir)
    assert front_matter(folder / "README.md")["license"] == "cc-by-4.0"
    assert "['benign', 'malignant']" in run_blocks(folder / "README.md", folder)


def test_pushed_files_hold_no_checkpoint_log_pickle_or_local_path(synthetic, tmp_path):  # noqa: F811
    folder = tmp_path / "release"
    shutil.copytree(synthetic.classifier_dir, folder)
    planted = ["checkpoints/step-0000002/model.safetensors", "checkpoint-3/optimizer.pt", "runs/events.out.tfevents.1.host",
               "logs/slimp/events.out.tfevents.2.host", "eval/results.json", "rng_state.pth", "bank/embeddings.safetensors",
               "random_states_0.pkl"]
    for name in planted:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    pushed = set(filter_repo_objects(files, ignore_patterns=PUSH_IGNORE))
    assert not pushed & set(planted), pushed & set(planted)
    assert {"config.json", "model.safetensors", "README.md", "results.json", "preprocessor_config.json"} <= pushed
    local = [str(Path(synthetic.dataset_dir).resolve().parent), str(Path(synthetic.classifier_dir).resolve().parent)]
    for name in pushed:
        text = (folder / name).read_bytes().decode("utf-8", "ignore")
        assert not any(path in text for path in local), f"{name} holds an absolute local path"
