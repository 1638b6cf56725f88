"""Stage two's optimizer (``train.model.make_optimizer``): AdamW, fused on CPU, checked against
AdamW written out by hand, and its checkpoints interchangeable with the per-tensor loop's (a
run saved before the fused kernel resumes with it, and the other way round)."""

from __future__ import annotations

import copy

import pytest
import torch

from store.runs import latest_checkpoint, load_checkpoint, save_checkpoint
from train.model import ModelConfig, build_model, make_optimizer

LR, BETAS, WD, EPS = 3e-3, (0.9, 0.95), 0.05, 1e-8


def small_model():
    torch.manual_seed(0)
    # linear text head: matrices (decayed) and biases / norms / logit scale (not decayed)
    return build_model(ModelConfig(tower="resnet10t", text_head="linear", embed_dim=16), 32)


def grads_for(model, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen) for p in model.parameters()]


def hand_adamw(model, steps: range) -> None:
    """AdamW as its paper writes it (decoupled decay, bias-corrected moments), parameter by
    parameter; decay only on tensors of 2 or more dimensions, as ``param_groups`` does."""
    state: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # moments (m, v) per parameter
    b1, b2 = BETAS
    with torch.no_grad():
        for step in steps:
            t = step + 1
            for i, (p, g) in enumerate(
                zip(model.parameters(), grads_for(model, step), strict=True)
            ):
                m, v = state.get(i, (torch.zeros_like(p), torch.zeros_like(p)))
                m = b1 * m + (1 - b1) * g
                v = b2 * v + (1 - b2) * g * g
                state[i] = (m, v)
                if p.ndim >= 2:
                    p.mul_(1 - LR * WD)
                m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
                p.sub_(LR * m_hat / (v_hat.sqrt() + EPS))


def optimizer_steps(model, opt, steps: range) -> None:
    for step in steps:
        for p, g in zip(model.parameters(), grads_for(model, step), strict=True):
            p.grad = g.clone()
        opt.step()


def assert_same_weights(a, b, atol: float = 2e-6) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=atol, rtol=1e-5), name


def test_fused_on_cpu_and_its_update_is_adamw_by_hand():
    model = small_model()
    reference = copy.deepcopy(model)
    opt = make_optimizer(model, LR, BETAS, WD, "cpu")
    assert opt.defaults["fused"] is True
    assert [g["weight_decay"] for g in opt.param_groups] == [WD, 0.0]

    optimizer_steps(model, opt, range(5))
    hand_adamw(reference, range(5))
    assert_same_weights(model, reference)
    # it moved: the comparison is not of two untouched models
    assert not torch.allclose(next(model.parameters()), next(small_model().parameters()))


def test_unknown_device_type_gets_the_per_tensor_loop():
    opt = make_optimizer(small_model(), LR, BETAS, WD, "meta")
    assert not opt.defaults["fused"]


@pytest.mark.parametrize("first_fused", [False, True])
def test_checkpoint_resumes_across_fused_and_per_tensor(tmp_path, first_fused):
    """3 steps with one kind, a checkpoint, 3 more with the other == 6 steps by hand."""
    model = small_model()
    reference = copy.deepcopy(model)

    def per_tensor(m):
        return torch.optim.AdamW(m.param_groups(WD), lr=LR, betas=BETAS, foreach=False, fused=False)

    def fused(m):
        return make_optimizer(m, LR, BETAS, WD, "cpu")

    first, second = (fused, per_tensor) if first_fused else (per_tensor, fused)
    opt = first(model)
    optimizer_steps(model, opt, range(3))
    save_checkpoint(tmp_path, model, opt, {"step": 3})

    resumed = small_model()  # fresh weights, overwritten by the checkpoint
    opt2 = second(resumed)
    assert load_checkpoint(latest_checkpoint(tmp_path), resumed, opt2)["step"] == 3
    optimizer_steps(resumed, opt2, range(3, 6))

    hand_adamw(reference, range(6))
    assert_same_weights(resumed, reference)
