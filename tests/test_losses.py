"""modeling_slimp.losses on one process: InfoNCE, NT-Xent, the nested combination, gather_features."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modeling_slimp.losses import gather_features, nested_contrastive_loss, nt_xent, symmetric_infonce


def unit_rows(n: int, d: int = 6, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return F.normalize(torch.randn(n, d), dim=-1).requires_grad_()


def reference_clip_loss(a, b, scale):
    logits = scale * a @ b.t()
    targets = torch.arange(a.shape[0])
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def reference_nt_xent(z1, z2, temperature):
    """SimCLR loss written as a loop over the 2N views."""
    views = torch.cat([z1, z2])
    n = z1.shape[0]
    terms = []
    for i in range(2 * n):
        positive = i + n if i < n else i - n
        similarities = views[i] @ views.t() / temperature
        others = torch.cat([similarities[:i], similarities[i + 1 :]])
        terms.append(-(similarities[positive] - torch.logsumexp(others, dim=0)))
    return torch.stack(terms).mean()


def test_symmetric_infonce_matches_clip_loss():
    a, b, scale = unit_rows(5, seed=0), unit_rows(5, seed=1), torch.tensor(7.5)
    loss, logits = symmetric_infonce(a, b, scale)
    torch.testing.assert_close(logits, scale * a @ b.t())
    torch.testing.assert_close(loss, reference_clip_loss(a, b, scale))


def test_symmetric_infonce_and_nt_xent_gradients_match_references():
    a, b, scale = unit_rows(5, seed=0), unit_rows(5, seed=1), torch.tensor(7.5, requires_grad=True)
    symmetric_infonce(a, b, scale)[0].backward()
    grads = [a.grad.clone(), b.grad.clone(), scale.grad.clone()]
    a.grad, b.grad, scale.grad = None, None, None
    reference_clip_loss(a, b, scale).backward()
    for grad, expected in zip(grads, [a.grad, b.grad, scale.grad]):
        torch.testing.assert_close(grad, expected)

    z1, z2 = unit_rows(4, seed=2), unit_rows(4, seed=3)
    nt_xent(z1, z2, 0.2).backward()
    grads = [z1.grad.clone(), z2.grad.clone()]
    z1.grad, z2.grad = None, None
    reference_nt_xent(z1, z2, 0.2).backward()
    torch.testing.assert_close(grads[0], z1.grad)
    torch.testing.assert_close(grads[1], z2.grad)


def test_symmetric_infonce_is_symmetric_in_its_inputs():
    a, b, scale = unit_rows(4, seed=2), unit_rows(4, seed=3), torch.tensor(3.0)
    torch.testing.assert_close(symmetric_infonce(a, b, scale)[0], symmetric_infonce(b, a, scale)[0])


def test_infonce_with_a_single_pair_is_zero_and_attached():
    a, b = unit_rows(1, seed=0), unit_rows(1, seed=1)
    scale = torch.tensor(2.0, requires_grad=True)
    loss, logits = symmetric_infonce(a, b, scale)
    assert logits.shape == (1, 1)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(a.grad, torch.zeros_like(a)) and scale.grad.item() == 0.0


def test_nt_xent_matches_loop_reference():
    z1, z2 = unit_rows(5, seed=4), unit_rows(5, seed=5)
    torch.testing.assert_close(nt_xent(z1, z2, 0.2), reference_nt_xent(z1, z2, 0.2))


def test_nt_xent_prefers_matching_views():
    z1 = unit_rows(6, seed=6)
    aligned = nt_xent(z1, z1.detach() + 0.01, 0.1)
    shuffled = nt_xent(z1, z1.detach().roll(1, dims=0), 0.1)
    assert aligned < shuffled


@pytest.mark.parametrize("lesion_weight", [0.0, 0.3, 1.0])
def test_nested_loss_combines_terms(lesion_weight):
    image, lesion = unit_rows(7, seed=1), unit_rows(7, seed=2)
    phenotype, patient = unit_rows(3, seed=3), unit_rows(3, seed=4)
    s1, s2 = torch.tensor(10.0), torch.tensor(4.0)
    out = nested_contrastive_loss(image, lesion, phenotype, patient, s1, s2, lesion_loss_weight=lesion_weight)
    torch.testing.assert_close(out.lesion_loss, reference_clip_loss(image, lesion, s1))
    torch.testing.assert_close(out.patient_loss, reference_clip_loss(phenotype, patient, s2))
    torch.testing.assert_close(out.loss, lesion_weight * out.lesion_loss + (1 - lesion_weight) * out.patient_loss)
    assert out.image_ssl_loss is None
    assert out.logits_per_image.shape == (7, 7) and out.logits_per_phenotype.shape == (3, 3)


def test_nested_loss_with_image_ssl_term():
    image, lesion, view2 = unit_rows(5, seed=1), unit_rows(5, seed=2), unit_rows(5, seed=9)
    phenotype, patient = unit_rows(2, seed=3), unit_rows(2, seed=4)
    scale = torch.tensor(5.0)
    out = nested_contrastive_loss(image, lesion, phenotype, patient, scale, scale, lesion_loss_weight=0.6,
                                  ssl_image_embeds=view2, image_ssl_weight=0.25, ssl_temperature=0.3)
    nested = 0.6 * out.lesion_loss + 0.4 * out.patient_loss
    torch.testing.assert_close(out.image_ssl_loss, reference_nt_xent(image, view2, 0.3))
    torch.testing.assert_close(out.loss, 0.75 * nested + 0.25 * out.image_ssl_loss)
    # With weight 0 the second view is ignored.
    plain = nested_contrastive_loss(image, lesion, phenotype, patient, scale, scale, lesion_loss_weight=0.6,
                                    ssl_image_embeds=view2)
    assert plain.image_ssl_loss is None
    torch.testing.assert_close(plain.loss, nested)


def test_single_patient_gives_zero_patient_loss_not_nan():
    image, lesion = unit_rows(4, seed=1), unit_rows(4, seed=2)
    phenotype, patient = unit_rows(1, seed=3), unit_rows(1, seed=4)
    out = nested_contrastive_loss(image, lesion, phenotype, patient, torch.tensor(14.0), torch.tensor(14.0))
    assert out.patient_loss.item() == 0.0
    assert math.isfinite(out.loss.item())
    torch.testing.assert_close(out.loss, 0.5 * out.lesion_loss)
    out.loss.backward()
    assert torch.isfinite(phenotype.grad).all()


def test_gather_features_without_process_group_is_identity():
    x = torch.randn(3, 4, requires_grad=True)
    gathered, offset = gather_features(x, rank=0, world_size=1)
    assert gathered is x and offset == 0
