"""What the model says when handed something wrong: another architecture's checkpoint, a checkpoint whose code
differs from the running code, a NaN pixel, a single batch too large for the loss's (N, N) logits."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from transformers import ViTModel
from transformers.utils import logging as hf_logging

import modeling_slimp.modeling_slimp as modeling
from conftest import make_batch, tiny_config, tiny_vision_config
from modeling_slimp import SLIMPForLesionClassification, SLIMPModel


@pytest.fixture
def warnings_seen(caplog):
    hf_logging.enable_propagation()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        yield caplog
    hf_logging.disable_propagation()


@pytest.mark.parametrize("model_class", [SLIMPModel, SLIMPForLesionClassification])
def test_another_architectures_checkpoint_is_refused_with_the_way_to_use_it(model_class, tmp_path):
    torch.manual_seed(0)
    ViTModel(tiny_vision_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"holds a 'vit' checkpoint.*from_vision_pretrained"):
        model_class.from_pretrained(tmp_path)
    model = SLIMPModel.from_vision_pretrained(str(tmp_path), config=tiny_config())  # the way it names
    assert model.config.vision_config.model_type == "vit"


def test_a_checkpoint_whose_code_differs_from_the_running_code_is_named(tmp_path, warnings_seen):
    SLIMPModel(tiny_config()).save_pretrained(tmp_path)
    assert (tmp_path / "modeling_slimp.py").is_file()
    SLIMPModel.from_pretrained(tmp_path)
    assert "differ from the SLIMP code running now" not in warnings_seen.text  # the same code: silent

    lines = (tmp_path / "modeling_slimp.py").read_text().splitlines()
    lines[9] += "  # edited"
    (tmp_path / "modeling_slimp.py").write_text("\n".join(lines) + "\n")
    warnings_seen.clear()
    SLIMPForLesionClassification.from_pretrained(tmp_path)
    message = warnings_seen.text
    assert "differ from the SLIMP code running now" in message
    assert "modeling_slimp.py (first difference at line 10)" in message
    assert "metadata_encoder.py" not in message  # only the file that differs


def test_code_files_of_a_subfolder_checkpoint_are_compared_too(tmp_path, warnings_seen):
    SLIMPModel(tiny_config()).save_pretrained(tmp_path / "model")
    shutil.copy(modeling.__file__.replace("modeling_slimp.py", "pooling.py"), tmp_path / "model" / "pooling.py")
    (tmp_path / "model" / "pooling.py").write_text((tmp_path / "model" / "pooling.py").read_text() + "# later\n")
    SLIMPModel.from_pretrained(tmp_path, subfolder="model")
    assert "pooling.py (first difference at line" in warnings_seen.text


@pytest.mark.parametrize("model_class", [SLIMPModel, SLIMPForLesionClassification])
def test_a_nan_or_inf_pixel_is_an_error_naming_the_lesion(model_class):
    model = model_class(tiny_config()).eval()
    batch = make_batch(model.config)
    batch["pixel_values"][4, 1, 7, 3] = float("nan")
    batch["pixel_values"][6, 0, 0, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"pixel_values of lesion\(s\) \[4, 6\] \(of 7\) hold NaN or inf"):
        model(**batch)


def test_a_nan_pixel_in_the_second_view_or_a_feature_getter_is_named_too():
    model = SLIMPModel(tiny_config(image_ssl_weight=0.5))
    batch = make_batch(model.config)
    second = batch["pixel_values"].clone()
    second[2] = float("nan")
    with pytest.raises(ValueError, match=r"ssl_pixel_values of lesion\(s\) \[2\]"):
        model(**batch, ssl_pixel_values=second, return_loss=True)
    with pytest.raises(ValueError, match=r"pixel_values of lesion\(s\) \[2\]"):
        model.get_image_features(second)


def test_a_single_loss_batch_above_the_documented_size_warns_with_the_hint(monkeypatch, warnings_seen):
    monkeypatch.setattr(modeling, "LARGE_LOSS_BATCH", 6)  # 8,192 lesions in the release; 7 here
    model = SLIMPModel(tiny_config())
    batch = make_batch(model.config)  # 7 lesions
    model(**batch)
    assert "return_loss=True on" not in warnings_seen.text  # embeddings only: no (N, N) loss
    model(**batch, return_loss=True)
    assert "return_loss=True on 7 lesions in one forward" in warnings_seen.text
    assert "batches of at most 6 lesions" in warnings_seen.text
