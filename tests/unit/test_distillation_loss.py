"""The distillation KL (one chunked pass for loss, gradient and agreement) against torch's own ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cluster.swiftkv.distill import tempered_kl


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-3)])
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_tempered_kl_matches_torch_in_value_gradient_and_agreement(dtype, atol, chunk):
    g = torch.Generator().manual_seed(1)
    student = (torch.randn(3, 7, 50, generator=g) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(3, 7, 50, generator=g) * 3).to(dtype)
    teacher[0, :4] = student[0, :4].detach() * 2  # some rows agree on the argmax, most do not
    kl, agree = tempered_kl(student, teacher, 2.0, chunk)
    (kl * 3).backward()
    got_grad, student.grad = student.grad.clone(), None

    ref = F.kl_div(F.log_softmax(student.float() / 2, -1).flatten(0, 1), F.log_softmax(teacher.float() / 2, -1)
                   .flatten(0, 1), log_target=True, reduction="batchmean") * 4
    (ref * 3).backward()
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad.float(), student.grad.float(), rtol=0, atol=atol)
    expected = (student.argmax(-1) == teacher.argmax(-1)).float().mean()
    assert 0 < expected < 1 and agree.item() == pytest.approx(expected.item())


def test_tempered_kl_is_zero_with_a_zero_gradient_when_the_student_is_the_teacher():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(2)).requires_grad_()
    kl, agree = tempered_kl(logits, logits.detach().clone(), 2.0, chunk=2)
    kl.backward()
    assert abs(kl.item()) < 1e-6 and agree.item() == 1.0
    assert logits.grad.abs().max() < 1e-7
