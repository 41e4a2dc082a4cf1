"""peft LoRA on SLIMPForLesionClassification: the documented layer names are targetable, train, save, merge."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import make_batch, tiny_config
from modeling_slimp import SLIMPForLesionClassification

# transformers 5 ViT layers name their attention projections q_proj/k_proj/v_proj/o_proj, like the
# metadata towers, so one short list reaches all three towers.
TARGET_MODULES = ["q_proj", "v_proj", "out_proj", "fc1"]


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGET_MODULES, modules_to_save=["classifier"])


def test_lora_trains_only_adapters_and_head_then_saves_reloads_and_merges(tmp_path):
    torch.manual_seed(0)
    config = tiny_config(feature_dropout=0.0)
    base = SLIMPForLesionClassification(config)
    base.save_pretrained(tmp_path / "base")
    batch = make_batch(config, lesions_per_patient=(2, 3, 1))
    labels = torch.tensor([0, 1, 2, 1, 0, 2])

    model = get_peft_model(base, lora_config())
    lora_modules = {name.rsplit(".", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    towers = ("slimp.vision_model.", "slimp.lesion_metadata_model.", "slimp.patient_metadata_model.")
    for tower in towers:  # every tower got adapters on q_proj and v_proj
        for projection in ("q_proj", "v_proj"):
            assert any(tower in name and name.split(".lora_A")[0].endswith(projection) for name in lora_modules), (tower, projection)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name or "classifier.modules_to_save." in name for name in trainable), trainable
    assert any("classifier.modules_to_save." in name for name in trainable)

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # the second step also moves lora_A (its gradient is 0 while lora_B is 0)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed <= trainable, changed - trainable
    for tower in towers:
        assert any(tower in name and ".lora_B." in name for name in changed), tower
    assert any("classifier.modules_to_save." in name for name in changed)

    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
        with model.disable_adapter():
            base_logits = model(**batch).logits
    assert not torch.allclose(logits, base_logits, atol=1e-4)  # the adapter matters, so reloading is a real check

    model.save_pretrained(tmp_path / "adapter")
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert "adapter_model.safetensors" in saved and "adapter_config.json" in saved
    assert not [name for name in saved if name.endswith((".bin", ".pt", ".pth"))]

    fresh = SLIMPForLesionClassification.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, logits, rtol=0, atol=1e-6)
        merged = reloaded.merge_and_unload()
        assert type(merged) is SLIMPForLesionClassification
        assert not any("lora_" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**batch).logits, logits, rtol=0, atol=1e-5)


def test_lora_with_reentrant_checkpointing_trains_the_adapters_of_all_three_towers():
    """Reentrant checkpointing returns no gradient unless a block's input requires one: with every base weight
    frozen, only `enable_input_require_grads` (which peft calls) makes the tokens require it, and it must reach the
    metadata towers' feature tokenizers as it reaches the image tower's patch embedding."""
    torch.manual_seed(0)
    base = SLIMPForLesionClassification(tiny_config(feature_dropout=0.0))
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = get_peft_model(base, lora_config())
    model.train()
    batch = make_batch(base.config, lesions_per_patient=(2, 3, 1))
    model(**batch, labels=torch.tensor([0, 1, 2, 1, 0, 2])).loss.backward()
    towers = ("slimp.vision_model.", "slimp.lesion_metadata_model.", "slimp.patient_metadata_model.")
    for tower in towers:
        grads = [p.grad for name, p in model.named_parameters() if tower in name and ".lora_B." in name]
        assert grads and all(g is not None for g in grads), f"{tower}: adapters without a gradient"
        assert all(g.abs().sum() > 0 for g in grads), tower
