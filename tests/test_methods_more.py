"""The defining property of L2, EWC, LwF and A-GEM on the tiny model (their smoke runs are in test_methods)."""
import math

import pytest
import torch

import lora
import methods.ewc
from methods import METHODS
from methods.base import collate, nll
from methods.l2 import drift
from test_methods import method_args, setup  # noqa: F401 (fixture)


def perturb(model, std=0.5, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.normal_(0, std)


def scale_b(model, c):
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            m.lora_B.weight.mul_(c)


def test_l2_penalty_is_the_drift_and_grows_with_it(setup):
    tok, model, task, memory = setup
    l2 = METHODS["l2"](method_args("l2", l2_lambda=2.0))
    b = collate(task[:2], tok.pad_id)
    assert drift(model).item() == 0  # fresh LoRA: B = 0
    assert torch.allclose(l2.loss(model, b), nll(model, b))
    perturb(model)
    ref = sum((m.delta() ** 2).sum() for _, m in lora.lora_layers(model))
    assert torch.allclose(drift(model), ref, rtol=1e-5)
    assert torch.allclose(l2.loss(model, b) - nll(model, b), ref, rtol=1e-4)  # lambda / 2 = 1
    values = []
    for _ in range(3):
        values.append(drift(model).item())
        scale_b(model, 2.0)
    assert values[0] > 0 and values[1] == pytest.approx(4 * values[0], rel=1e-5) and values[2] > values[1]


def test_ewc_penalty_is_zero_at_start_and_grows_with_drift(setup):
    tok, model, task, memory = setup
    ewc = METHODS["ewc"](method_args("ewc", ewc_lambda=1e3))
    ewc.begin_task(model, task, memory)
    b = collate(task[:2], tok.pad_id)
    assert torch.equal(ewc.loss(model, b), nll(model, b))  # B = 0: no drift, no penalty
    perturb(model, std=0.05)
    penalties = []
    for _ in range(3):
        penalties.append((ewc.loss(model, b) - nll(model, b)).item())
        scale_b(model, 2.0)
    assert 0 < penalties[0] < penalties[1] < penalties[2]


def test_ewc_fisher_is_the_mean_of_batch_squared_grads_at_theta_safe(setup, monkeypatch):
    _, model, task, memory = setup
    perturb(model)  # the Fisher must be taken with the adapters disabled, whatever they hold
    calls = []
    monkeypatch.setattr(methods.ewc, "nll", lambda m, b: calls.append(len(b["idx"])) or nll(m, b))
    ewc = METHODS["ewc"](method_args("ewc", fisher_batch_size=4))
    ewc.begin_task(model, task, memory)
    assert calls == [4, 2]  # batched: ceil(6 / 4) forward/backward passes, not one per example
    layers = [m for _, m in lora.lora_layers(model)]
    assert all(not m.weight.requires_grad for m in layers)  # the base stays frozen afterwards
    weights = [m.weight.requires_grad_(True) for m in layers]
    expected = [torch.zeros_like(w) for w in weights]
    for chunk in (memory[:4], memory[4:]):  # by hand: squared grads of each batch's mean NLL, averaged
        with lora.disabled(model):
            grads = torch.autograd.grad(nll(model, collate(chunk)), weights)
        for e, g in zip(expected, grads):
            e += g ** 2 / 2
    for w in weights:
        w.requires_grad_(False)
    assert len(ewc.fisher) == len(layers)
    for (m, f), e, layer in zip(ewc.fisher, expected, layers):
        assert m is layer and f.shape == layer.weight.shape
        assert (f >= 0).all() and f.sum() > 0
        assert torch.allclose(f, e, rtol=1e-5, atol=1e-12)


def test_ewc_fisher_batches_caps_the_passes(setup, monkeypatch):
    _, model, task, memory = setup
    calls = []
    monkeypatch.setattr(methods.ewc, "nll", lambda m, b: calls.append(len(b["idx"])) or nll(m, b))
    METHODS["ewc"](method_args("ewc", fisher_batch_size=2, fisher_batches=2)).begin_task(model, task, memory)
    assert calls == [2, 2]


@pytest.mark.parametrize("hidden", [False, True])
def test_lwf_term_is_zero_for_the_teacher_and_positive_after_drift(setup, hidden):
    tok, model, task, _ = setup
    lwf = METHODS["lwf"](method_args("lwf", lwf_hidden=hidden))
    b = collate(task[:3], tok.pad_id)
    assert torch.allclose(lwf.loss(model, b), nll(model, b), atol=1e-6)  # fresh LoRA: the model is theta_safe
    perturb(model)
    assert (lwf.loss(model, b) - nll(model, b)).item() > 1e-4


def test_lwf_kl_matches_the_formula(setup):
    tok, model, task, _ = setup
    perturb(model)
    T, lam = 3.0, 0.7
    lwf = METHODS["lwf"](method_args("lwf", lwf_temperature=T, lwf_lambda=lam))
    b = collate(task[:3], tok.pad_id)
    mask = b["labels"][:, 1:] != -100
    student = model(b["idx"])[:, :-1][mask]
    with lora.disabled(model):
        teacher = model(b["idx"])[:, :-1][mask]
    p = torch.softmax(teacher / T, -1)
    kl = (p * (torch.log_softmax(teacher / T, -1) - torch.log_softmax(student / T, -1))).sum(-1).mean()
    assert torch.allclose(lwf.loss(model, b) - nll(model, b), lam * T ** 2 * kl, rtol=1e-4)


def agem_case(setup, sign):
    """An A-GEM method, the memory gradient g_ref, and .grad set to g = sign * g_ref + noise."""
    _, model, task, memory = setup
    perturb(model, std=0.1)
    params = lora.lora_parameters(model)
    agem = METHODS["agem"](method_args("agem", mem_batch_size=len(memory)))  # the batch is all of M
    agem.begin_task(model, task, memory)
    g_ref = torch.cat([g.flatten() for g in torch.autograd.grad(nll(model, collate(memory)), params)])
    torch.manual_seed(1)
    g = sign * g_ref + 0.5 * g_ref.norm() / math.sqrt(g_ref.numel()) * torch.randn_like(g_ref)
    for p, chunk in zip(params, g.split([p.numel() for p in params])):
        p.grad = chunk.view_as(p).clone()
    agem.after_backward(model)
    return g, g_ref, torch.cat([p.grad.flatten() for p in params])


def test_agem_projects_a_conflicting_gradient(setup):
    g, g_ref, projected = agem_case(setup, -1.0)
    assert g @ g_ref < 0
    assert projected @ g_ref >= -1e-6 * g_ref.norm() * projected.norm()
    assert torch.allclose(projected, g - (g @ g_ref) / (g_ref @ g_ref) * g_ref, rtol=1e-4, atol=1e-7)


def test_agem_leaves_an_agreeing_gradient_alone(setup):
    g, g_ref, projected = agem_case(setup, 1.0)
    assert g @ g_ref >= 0
    assert torch.equal(projected, g)
