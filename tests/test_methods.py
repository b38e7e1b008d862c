"""Every method: a few steps through the loop, gradient accumulation leaves its step as it was, and its
defining property on the tiny model (in the order of methods/); the newer ones end to end through train.main."""
import json
import math
import os

import pytest
import torch

import lora
import methods.method
import methods.magmax as magmax
import methods.safelora as safelora
import train
from batches import collate
from conftest import method_args, perturb
from loop import fit, lr_at, n_steps
from methods import METHODS, make
from methods.l2 import drift
from methods.method import base_weights, nll, trainable
from model import Transformer
from test_train import FAST, FIX


def lora_state(model):
    return [p.detach().clone() for p in lora.lora_parameters(model)]


def grads(loss, model):
    return torch.autograd.grad(loss, lora.lora_parameters(model))


def train_steps(method, model, tok, task, memory, **kw):
    """begin_task, the loop (lr 1e-2, batches of 2, one epoch unless kw says otherwise), end_task; the LoRA after."""
    method.begin_task(model, task, memory)
    fit(model, method, method.data(task, memory), **{"lr": 1e-2, "epochs": 1, "batch_size": 2, "pad_id": tok.pad_id, **kw})
    method.end_task(model)
    return lora_state(model)


def fresh(tiny_checkpoint):
    torch.manual_seed(0)
    return lora.apply_lora(Transformer.from_pretrained(tiny_checkpoint), rank=4, alpha=8)


# ----------------------------------------------------------------------------- every method

@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains(name, setup, tiny_base):
    tok, model, task, memory = setup
    before = lora_state(model)
    method = make(name, method_args(name, base_model=str(tiny_base)))
    method.begin_task(model, task, memory)
    losses = fit(model, method, method.data(task, memory), lr=1e-2, epochs=1, batch_size=2, pad_id=tok.pad_id)
    method.end_task(model)
    assert losses and all(math.isfinite(v) for _, v in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, lora.lora_parameters(model)))


def test_nll_is_mean_over_target_tokens(setup):
    tok, model, task, _ = setup
    b = collate(task[:3], tok.pad_id)
    logits = model(b["idx"])[:, :-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), b["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(nll(model, b), ref, atol=1e-6)



@pytest.mark.parametrize("softcap", [None, 30.0])
def test_nll_in_chunks_has_the_gradient_of_nll_in_one_piece(setup, monkeypatch, softcap):
    """Over LOSS_ROWS targets nll computes its logits a chunk at a time, each chunk's gradient at once: the loss and
    the LoRA's gradients (through a loss scaled afterwards, as the loop's accumulation does) are those of one piece."""
    tok, model, task, _ = setup
    model.lm_head.softcap = softcap  # Gemma 2's capped logits go through the chunks too
    b = collate(task[:3], tok.pad_id)
    one = [nll(model, b)]
    one += grads(3 * one[0], model)
    rows = []
    monkeypatch.setattr(methods.method, "LOSS_ROWS", 4)
    monkeypatch.setattr(type(model.lm_head), "__call__", lambda self, x: rows.append(len(x)) or torch.nn.Module.__call__(self, x))
    chunked = [nll(model, b)]
    chunked += grads(3 * chunked[0], model)
    assert len(b["tgt"]) > 8 and max(rows) == 4 and sum(rows) == len(b["tgt"])  # in chunks, every target once
    for a, c in zip(one, chunked):
        assert torch.allclose(a, c, rtol=1e-5, atol=1e-7)


def test_nll_of_a_trainable_head_keeps_the_heads_gradient(setup, monkeypatch):
    tok, model, task, _ = setup
    b, head = collate(task[:3], tok.pad_id), model.lm_head.weight
    head.requires_grad_(True)  # full fine-tuning of the head (tied: the embedding too): it needs the whole graph
    one = torch.autograd.grad(nll(model, b), head)[0]
    monkeypatch.setattr(methods.method, "LOSS_ROWS", 4)
    assert torch.allclose(torch.autograd.grad(nll(model, b), head)[0], one, rtol=1e-5, atol=1e-7)

class Captured(Exception):
    """Raised from after_backward with the first step's gradients."""


def first_step_grads(name, tiny_checkpoint, tiny_base, setup, batch_size, grad_accum, step_term=True, **flags):
    """The LoRA gradients of a method's first optimizer step through the loop, as the optimizer would see them."""
    tok, _, task, memory = setup
    model = fresh(tiny_checkpoint)
    perturb(model, std=0.1, seed=3)  # away from theta_safe: every penalty and teacher term has a gradient
    method = make(name, method_args(name, base_model=str(tiny_base), **flags))
    method.begin_task(model, task, memory)
    if not step_term:
        method.step_loss = lambda model: None
    after = method.after_backward

    def capture(m):
        after(m)
        raise Captured([p.grad.clone() for p in trainable(m)])
    method.after_backward = capture
    torch.manual_seed(0)  # refresh's noise
    with pytest.raises(Captured) as e:
        fit(model, method, method.data(task, memory), lr=0.0, epochs=1, batch_size=batch_size, grad_accum=grad_accum,
            pad_id=tok.pad_id)
    return e.value.args[0]


# lisa in its fine-tuning state: in the alignment state each micro-batch is replaced by a memory batch of its size
FLAGS = {"lisa": dict(lisa_align_steps=0), "refresh": dict(refresh_inner="der")}


@pytest.mark.parametrize("name", list(METHODS))
def test_gradient_accumulation_leaves_the_step_as_it_was(name, tiny_checkpoint, tiny_base, setup):
    """--grad-accum 2 --batch-size 4 gives --batch-size 8's gradient: the micro-batches (of unequal target tokens)
    are weighted by their tokens, and a step term (penalty, memory batch) counts once."""
    whole = first_step_grads(name, tiny_checkpoint, tiny_base, setup, 8, 1, **FLAGS.get(name, {}))
    split = first_step_grads(name, tiny_checkpoint, tiny_base, setup, 4, 2, **FLAGS.get(name, {}))
    assert sum(g.norm() for g in whole) > 1e-3
    for a, b in zip(whole, split):  # 1e-6 of the gradient's scale (EWC's is ~50): fp32 rounding, not a change
        assert (a - b).abs().max() <= 1e-6 * max(1.0, a.abs().max())


@pytest.mark.parametrize("name", ["der", "derpp", "ewc", "l2"])
def test_a_step_term_counts_once_per_step(name, tiny_checkpoint, tiny_base, setup):
    full = first_step_grads(name, tiny_checkpoint, tiny_base, setup, 4, 2)
    user = first_step_grads(name, tiny_checkpoint, tiny_base, setup, 4, 2, step_term=False)
    tok, _, task, memory = setup
    model = fresh(tiny_checkpoint)
    perturb(model, std=0.1, seed=3)
    method = make(name, method_args(name))
    method.begin_task(model, task, memory)
    term = grads(method.step_loss(model), model)  # the same memory draw as the step's
    assert sum(g.norm() for g in term) > 1e-4
    for f, u, t in zip(full, user, term):
        assert (f - u - t).abs().max() <= 1e-6 * max(1.0, t.abs().max())


def test_the_probe_measures_the_memory_loss_and_changes_nothing(tiny_checkpoint, setup):
    """fit's probe: the mean NLL over the probe's target tokens at each recorded step; the run is the same without it."""
    tok, _, task, memory = setup
    probe = memory[:5]
    runs = []
    for with_probe in (False, True):
        model = fresh(tiny_checkpoint)
        torch.manual_seed(0)
        losses = fit(model, make("sft", method_args("sft")), task, lr=1e-2, epochs=3, batch_size=2, pad_id=tok.pad_id,
                     probe=probe if with_probe else None)
        runs.append((losses, lora_state(model), model))
    (plain, w_plain, _), (probed, w_probed, model) = runs
    assert [x[:2] for x in probed] == plain and all(torch.equal(a, b) for a, b in zip(w_plain, w_probed))
    with torch.no_grad():
        n = [sum(l != -100 for l in ex["labels"][1:]) for ex in probe]
        by_hand = sum(nll(model, collate([ex])).item() * k for ex, k in zip(probe, n)) / sum(n)
    assert probed[-1][2] == pytest.approx(by_hand, rel=1e-5)  # the last record is after the last step
    assert probed[0][2] != pytest.approx(probed[-1][2], rel=1e-3)  # training on the task moved it


def test_make_builds_a_wrapper_with_its_inner_method():
    refresh = make("refresh", method_args("refresh", refresh_inner="derpp"))
    assert type(refresh.inner).__name__ == "DERPP"
    args = method_args("refresh")
    args.refresh_inner = "refresh"
    with pytest.raises(ValueError, match="--refresh-inner 'refresh'"):
        make("refresh", args)


# ----------------------------------------------------------------------------- A-GEM

def agem_case(setup, sign, project="gradient"):
    """An A-GEM method, the memory gradient g_ref, and .grad set to g = sign * g_ref + noise."""
    _, model, task, memory = setup
    perturb(model, std=0.1)
    params = lora.lora_parameters(model)
    agem = METHODS["agem"](method_args("agem", mem_batch_size=len(memory), agem_project=project))  # the batch is all of M
    agem.begin_task(model, task, memory)
    g_ref = torch.cat([g.flatten() for g in torch.autograd.grad(nll(model, collate(memory)), params)])
    torch.manual_seed(1)
    g = sign * g_ref + 0.5 * g_ref.norm() / math.sqrt(g_ref.numel()) * torch.randn_like(g_ref)
    for p, chunk in zip(params, g.split([p.numel() for p in params])):
        p.grad = chunk.view_as(p).clone()
    agem.after_backward(model)
    return agem, model, g, g_ref, torch.cat([p.grad.flatten() for p in params])


def test_agem_gradient_rule_projects_a_conflicting_gradient(setup):
    agem, _, g, g_ref, projected = agem_case(setup, -1.0)
    assert g @ g_ref < 0
    assert projected @ g_ref >= -1e-6 * g_ref.norm() * projected.norm()
    assert torch.allclose(projected, g - (g @ g_ref) / (g_ref @ g_ref) * g_ref, rtol=1e-4, atol=1e-7)


def test_agem_gradient_rule_leaves_an_agreeing_gradient_alone(setup):
    _, _, g, g_ref, projected = agem_case(setup, 1.0)
    assert g @ g_ref >= 0
    assert torch.equal(projected, g)


def adam_step(model, lr=1e-2):
    """One AdamW step on the LoRA parameters' .grad (its first step: lr * sign(g), whatever g's scale)."""
    opt = torch.optim.AdamW(lora.lora_parameters(model), lr=lr, weight_decay=0.0)
    opt.step()


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_agem_projects_the_optimizers_step(setup, sign):
    """The step taken, u = w_new - w, never points up the memory's loss: u . g_ref <= 0, by the A-GEM formula on u."""
    agem, model, g, g_ref, grad = agem_case(setup, sign, project="update")
    assert torch.equal(grad, g)  # the gradient is left to the optimizer
    w0 = torch.cat([p.detach().flatten() for p in lora.lora_parameters(model)])
    adam_step(model)
    u = torch.cat([p.detach().flatten() for p in lora.lora_parameters(model)]) - w0
    agem.after_step(model)
    taken = torch.cat([p.detach().flatten() for p in lora.lora_parameters(model)]) - w0
    expected = u - (u @ g_ref) / (g_ref @ g_ref) * g_ref if u @ g_ref > 0 else u
    assert torch.allclose(taken, expected, atol=1e-6)
    assert taken @ g_ref <= 1e-6 * g_ref.norm() * taken.norm()
    step = agem.report()["agem"]["steps"][0]
    assert step["fired"] == bool(u @ g_ref > 0) and step["cos_grad"] == pytest.approx(cos(g, g_ref), abs=1e-5)
    assert step["cos_update"] == pytest.approx(cos(u, -g_ref), abs=1e-5) and step["memory_loss"] > 0
    if sign < 0:  # a conflicting gradient: Adam's sign-like step conflicts too, and the projection fired
        assert step["fired"] and agem.report()["agem"]["fired_share"] == 1.0


def test_agem_on_the_gradient_does_not_bind_adams_step(setup):
    """Why the default projects the step: a gradient projected to be orthogonal to g_ref, fed to AdamW,
    gives a step that is no longer orthogonal to g_ref (AdamW rescales each coordinate): whether it raises
    the memory's loss is left to chance."""
    agem, model, g, g_ref, projected = agem_case(setup, -1.0)
    assert abs(projected @ g_ref) <= 1e-4 * projected.norm() * g_ref.norm()  # orthogonal: the rule is met for SGD
    w0 = torch.cat([p.detach().flatten() for p in lora.lora_parameters(model)])
    adam_step(model)
    u = torch.cat([p.detach().flatten() for p in lora.lora_parameters(model)]) - w0
    assert abs(cos(u, g_ref)) > 0.01  # 100x further from orthogonal than the projected gradient


# ----------------------------------------------------------------------------- constrained SFT

def test_csft_weights_are_one_and_gradient_is_sft_at_the_reference(setup):
    tok, model, task, _ = setup  # fresh LoRA: the model equals its reference theta_safe
    csft = METHODS["csft"](method_args("csft"))
    b = collate(task[:3], tok.pad_id)
    loss = csft.loss(model, b)
    assert torch.allclose(loss, nll(model, b), atol=1e-6)  # every w_t = 1
    for g, g_sft in zip(grads(csft.loss(model, b), model), grads(nll(model, b), model)):
        assert torch.allclose(g, g_sft, atol=1e-7)
    logp = torch.tensor([-1.0, -2.0, -3.0])
    assert torch.equal(csft.weights(logp, logp, torch.tensor([1, 3, 9])), torch.ones(3))


def test_csft_beta_by_position_and_weights_move_the_right_way(setup):
    csft = METHODS["csft"](method_args("csft"))
    pos = torch.arange(1, 9)
    up = csft.weights(torch.zeros(8), torch.full((8,), -1.0), pos)  # the model rates the token higher than theta_safe
    beta = torch.tensor([0.5, 2, 2, 2, 2, 0.1, 0.1, 0.1])
    assert torch.allclose(up, 2 * (1 - torch.sigmoid(beta)))
    assert (up < 1).all() and up[1] < up[0] < up[5]  # the larger beta, the sooner the token stops being pushed
    far = csft.weights(torch.zeros(3), torch.full((3,), -20.0), torch.tensor([1, 2, 6]))  # 2 (1 - sigmoid(beta * 20))
    # 2 (1 - sigmoid(10)) = 9e-5 and 2 (1 - sigmoid(40)) = 8e-18 are clamped to 1e-3, as the authors' code does
    assert torch.allclose(far, torch.tensor([1e-3, 1e-3, 2 * (1 - torch.sigmoid(torch.tensor(2.0))).item()]))


def test_csft_gradient_is_that_of_qi_et_al_objective(setup):
    tok, model, task, _ = setup
    perturb(model, std=0.3)
    csft = METHODS["csft"](method_args("csft", csft_beta="0.5,2,0.1"))
    b = collate(task[:3], tok.pad_id)
    mask = b["labels"][:, 1:] != -100
    targets = b["labels"][:, 1:][mask]
    logp = torch.log_softmax(model(b["idx"])[:, :-1][mask], -1).gather(1, targets[:, None])[:, 0]
    with torch.no_grad(), lora.disabled(model):
        logp_safe = torch.log_softmax(model(b["idx"])[:, :-1][mask], -1).gather(1, targets[:, None])[:, 0]
    pos = torch.cat([torch.arange(1, int(n) + 1) for n in mask.sum(1)])  # one response per row
    beta = torch.tensor([0.5, 2, 0.1])[(pos - 1).clamp(max=2)]
    w = 2 * (1 - torch.sigmoid(beta * (logp.detach() - logp_safe)))
    clamped = w < 1e-3  # the authors' clamp: there the weight is 1e-3, the gradient 1e-3 x NLL's
    terms = torch.where(clamped, -1e-3 * logp, -2 / beta * torch.nn.functional.logsigmoid(beta * (logp - logp_safe)))
    qi = terms.sum() / mask.sum()
    for g, g_qi in zip(grads(csft.loss(model, b), model), grads(qi, model)):
        assert torch.allclose(g, g_qi, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(csft.loss(model, b), nll(model, b))


# ----------------------------------------------------------------------------- DER (and DER++)

@pytest.mark.parametrize("topk", [0, 5])
def test_der_loss_is_zero_when_model_equals_teacher(setup, topk):
    _, model, task, memory = setup
    der = METHODS["der"](method_args("der", der_topk=topk))
    der.begin_task(model, task, memory)  # fresh LoRA: the model is its own teacher
    # exactly zero with the teacher recomputed; with stored top-k, only bf16 rounding is left (rel. 2^-8)
    bound = 0 if topk == 0 else max((2 ** -8 * m["der_values"].float().abs().max()) ** 2 for m in memory[:3])
    assert der.logit_loss(model, memory[:3]).item() <= bound + 1e-12
    perturb(model)
    assert der.logit_loss(model, memory[:3]).item() > 1e-4


def test_der_stores_compact_topk(setup):
    _, model, task, memory = setup
    der = METHODS["der"](method_args("der", der_topk=5))
    der.begin_task(model, task, memory)
    n_targets = sum(l != -100 for l in memory[0]["labels"][1:])
    assert memory[0]["der_values"].shape == (n_targets, 5) and memory[0]["der_values"].dtype == torch.bfloat16


def test_derpp_adds_the_memory_label_loss_on_a_second_batch(setup):
    _, model, task, memory = setup
    perturb(model, std=0.1)
    der, derpp = (METHODS[n](method_args(n, beta=0.7)) for n in ("der", "derpp"))
    for m in (der, derpp):
        m.begin_task(model, task, memory)
    rng = derpp.rng.getstate()
    got = derpp.step_loss(model)
    derpp.rng.setstate(rng)
    first = derpp.sample_memory(4)
    second = derpp.sample_memory(4)
    assert torch.allclose(got, 0.5 * der.logit_loss(model, first) + 0.7 * nll(model, collate(second)), atol=1e-6)


# ----------------------------------------------------------------------------- EWC

def scale_b(model, c):
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            m.lora_B.weight.mul_(c)


def test_ewc_penalty_is_zero_at_start_and_grows_with_drift(setup):
    tok, model, task, memory = setup
    ewc = METHODS["ewc"](method_args("ewc", ewc_lambda=1e3))
    ewc.begin_task(model, task, memory)
    assert ewc.step_loss(model).item() == 0  # B = 0: no drift, no penalty
    perturb(model, std=0.05)
    penalties = []
    for _ in range(3):
        penalties.append(ewc.step_loss(model).item())
        scale_b(model, 2.0)
    assert 0 < penalties[0] < penalties[1] < penalties[2]


def test_ewc_fisher_squares_per_example_gradients_weighted_by_probability(setup):
    """mammoth's ewc_on Fisher, by hand: per example, the squared gradient of its mean NLL at theta_safe times
    the mean probability of its target tokens, averaged over the examples."""
    _, model, task, memory = setup
    perturb(model)  # the Fisher must be taken with the adapters disabled, whatever they hold
    ewc = METHODS["ewc"](method_args("ewc"))
    ewc.begin_task(model, task, memory)
    layers = [m for _, m in lora.lora_layers(model)]
    assert all(not m.weight.requires_grad for m in layers)  # the base stays frozen afterwards
    weights = [m.weight.requires_grad_(True) for m in layers]
    expected = [torch.zeros_like(w) for w in weights]
    batch_mean = [torch.zeros_like(w) for w in weights]
    with lora.disabled(model):
        for ex in memory:
            b = collate([ex])
            mask = b["labels"][:, 1:] != -100
            logp = torch.log_softmax(model(b["idx"])[:, :-1][mask], -1).gather(1, b["labels"][:, 1:][mask][:, None])
            p = logp.detach().exp().mean()
            for e, g in zip(expected, torch.autograd.grad(nll(model, b), weights)):
                e += p * g ** 2 / len(memory)
        for e, g in zip(batch_mean, torch.autograd.grad(nll(model, collate(memory)), weights)):
            e += g ** 2  # the squared gradient of the batch mean: what this EWC used until 2026-12
    for w in weights:
        w.requires_grad_(False)
    assert len(ewc.fisher) == len(layers)
    for (m, f), e, bm, layer in zip(ewc.fisher, expected, batch_mean, layers):
        assert m is layer and f.shape == layer.weight.shape
        assert (f >= 0).all() and f.sum() > 0
        assert torch.allclose(f, e, rtol=1e-4, atol=1e-12)
        assert not torch.allclose(f / f.sum(), bm / bm.sum(), rtol=0.05)  # not a constant times the batch form


def test_ewc_fisher_examples_caps_the_passes(setup, monkeypatch):
    _, model, task, memory = setup
    calls = []
    monkeypatch.setattr(methods.method, "collate", lambda ex, *a, **k: calls.append(len(ex)) or collate(ex, *a, **k))
    METHODS["ewc"](method_args("ewc", fisher_examples=2)).begin_task(model, task, memory)
    assert calls == [1, 1]


# ----------------------------------------------------------------------------- L2

def test_l2_penalty_is_the_drift_and_grows_with_it(setup):
    _, model, _, _ = setup
    l2 = METHODS["l2"](method_args("l2", l2_lambda=2.0))
    assert drift(model).item() == 0 and l2.step_loss(model).item() == 0  # fresh LoRA: B = 0
    perturb(model)
    ref = sum((m.delta() ** 2).sum() for _, m in lora.lora_layers(model))
    assert torch.allclose(drift(model), ref, rtol=1e-5)
    assert torch.allclose(l2.step_loss(model), ref, rtol=1e-4)  # lambda / 2 = 1
    values = []
    for _ in range(3):
        values.append(drift(model).item())
        scale_b(model, 2.0)
    assert values[0] > 0 and values[1] == pytest.approx(4 * values[0], rel=1e-5) and values[2] > values[1]


# ----------------------------------------------------------------------------- Lisa

def test_lisa_alternates_states_on_schedule(setup):
    tok, model, task, memory = setup
    lisa = METHODS["lisa"](method_args("lisa", lisa_align_steps=2, lisa_user_steps=3, lisa_rho=0.0))
    lisa.begin_task(model, task, memory)
    b = collate(task[:2], tok.pad_id)
    states = []
    for step in range(10):
        lisa.begin_step(model, step, [b, b], 10, 1.0)
        for _ in range(2):  # two micro-batches: the state holds for the whole step
            states.append(lisa.aligning)
            rng = lisa.rng.getstate()
            loss = lisa.loss(model, b)
            if lisa.aligning:  # the user batch is replaced by a memory batch of its size
                lisa.rng.setstate(rng)
                assert torch.allclose(loss, nll(model, collate(lisa.sample_memory(2))))
            else:
                assert torch.allclose(loss, nll(model, b))
    assert states[::2] == states[1::2] == [True] * 2 + [False] * 3 + [True] * 2 + [False] * 3


def test_lisa_proximal_term_is_zero_at_the_switch_and_grows_with_drift(setup):
    tok, model, task, memory = setup
    rho = 2.0
    lisa = METHODS["lisa"](method_args("lisa", lisa_align_steps=1, lisa_user_steps=1, lisa_rho=rho))
    lisa.begin_task(model, task, memory)
    b = collate(task[:2], tok.pad_id)
    lisa.begin_step(model, 0, [b], 1, 1.0)  # the alignment state begins: w_switch = w
    assert lisa.aligning and lisa.proximal(model).item() == 0
    drifts = []
    for _ in range(3):
        with torch.no_grad():
            for p in lora.lora_parameters(model):
                p.add_(0.01)
        drifts.append(lisa.proximal(model).item())
    n = sum(p.numel() for p in lora.lora_parameters(model))
    assert drifts == pytest.approx([n * 0.01 ** 2, n * 0.02 ** 2, n * 0.03 ** 2], rel=1e-3)
    lisa.begin_step(model, 1, [b], 1, 1.0)  # the user state begins at the drifted weights, so the term is 0 again
    assert not lisa.aligning and lisa.proximal(model).item() == 0 and torch.equal(lisa.loss(model, b), nll(model, b))
    with torch.no_grad():
        lora.lora_parameters(model)[0].add_(0.1)
    assert torch.allclose(lisa.step_loss(model), rho / 2 * lisa.proximal(model)) and lisa.proximal(model).item() > 0


def test_lisa_schedule_scales_the_reference_and_leaves_the_first_tenth_without_the_proximal_term(setup):
    tok, model, task, memory = setup
    lisa = METHODS["lisa"](method_args("lisa"))
    assert lisa.schedule(20000) == (100, 900)  # the reference script's run: 20000 steps, 100 : 900
    assert lisa.schedule(61) == (1, 9) and lisa.schedule(600) == (3, 27)
    assert METHODS["lisa"](method_args("lisa", lisa_align_steps=2)).schedule(61) == (2, 9)
    lisa.begin_task(model, task, memory)
    b = collate(task[:2], tok.pad_id)
    on = []
    for step in range(30):
        lisa.begin_step(model, step, [b], 30, 1.0)
        on.append(lisa.step_loss(model) is not None)
        with torch.no_grad():
            lora.lora_parameters(model)[0].add_(0.01)
    assert on == [False] * 4 + [True] * 26  # the reference's `steps > 0.1 * max_steps`: from step 4 of 30


# ----------------------------------------------------------------------------- LwF

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


# ----------------------------------------------------------------------------- MagMax

def one_lora_layer(w_base, w_aligned, delta):
    """A model of one LoRA'd 2x2 layer q_proj: frozen weight w_aligned, delta W = B A exactly (A = I, alpha = r)."""
    model = torch.nn.Module()
    model.q_proj = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.q_proj.weight.copy_(w_aligned)
    lora.apply_lora(model, rank=2, alpha=2, targets=("q_proj",))
    with torch.no_grad():
        model.q_proj.lora_A.weight.copy_(torch.eye(2))
        model.q_proj.lora_B.weight.copy_(delta)
    return model, {"q_proj.weight": w_base}


def test_magmax_on_hand_made_vectors():
    """tau_safe = W_aligned - W_base, tau_user = tau_safe + delta; per entry the larger magnitude, ties to tau_user."""
    w_base = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    tau_safe = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    delta = torch.tensor([[0.5, 3.0], [-1.0, -0.5]])
    # tau_user = [[1.5, 1.0], [-0.5, -0.25]]; larger magnitude: 1.5 (user), -2 (safe), -0.5 (tie: user), -0.25 (tie: user)
    merged = torch.tensor([[1.5, -2.0], [-0.5, -0.25]])
    model, base = one_lora_layer(w_base, w_base + tau_safe, delta)
    magmax.merge(model, base)
    assert torch.equal(model.q_proj.weight, w_base + merged) and not model.q_proj.lora_B.weight.any()
    model, base = one_lora_layer(w_base, w_base + tau_safe, delta)
    magmax.merge(model, base, scale=0.5)
    assert torch.equal(model.q_proj.weight, w_base + 0.5 * merged)
    # --magmax-delta: tau_user = delta = [[0.5, 3], [-1, -0.5]] against tau_safe: 1 (safe), 3, -1, -0.5 (user)
    model, base = one_lora_layer(w_base, w_base + tau_safe, delta)
    magmax.merge(model, base, delta_only=True)
    assert torch.equal(model.q_proj.weight, w_base + torch.tensor([[1.0, 3.0], [-1.0, -0.5]]))
    assert torch.equal(magmax.max_magnitude(torch.tensor([2.0, -1.0]), torch.tensor([-2.0, 1.0])), torch.tensor([-2.0, 1.0]))


def test_magmax_at_scale_one_keeps_each_entry_of_one_model_or_the_other(setup, tiny_base):
    _, model, _, _ = setup
    perturb(model, std=0.3)
    base = base_weights(model, tiny_base)
    layers = dict(lora.lora_layers(model))
    aligned = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    user = {n: aligned[n] + layers[n[: -len(".weight")]].delta().detach() if n[: -len(".weight")] in layers else aligned[n]
            for n in aligned}
    magmax.merge(model, base)
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        from_user = (p - user[name]).abs() <= 1e-6
        assert (from_user | ((p - aligned[name]).abs() <= 1e-6)).all(), name  # every entry is one model's
        if name[: -len(".weight")] in layers:
            assert from_user.any() and not from_user.all(), name  # and both won somewhere in a LoRA'd weight


def test_magmax_of_several_tasks_scales_once(setup, tiny_base):
    _, model, _, _ = setup
    base = base_weights(model, tiny_base)
    name, m = lora.lora_layers(model)[0]
    tau0 = m.weight.detach().clone() - base[f"{name}.weight"]
    perturb(model, std=0.3, seed=1)
    d1 = m.delta().detach().clone()
    magmax.merge(model, base, scale=0.5)
    perturb(model, std=0.3, seed=2)
    d2 = m.delta().detach().clone()
    magmax.merge(model, base, scale=0.5, prior_scale=0.5)
    tau1 = magmax.max_magnitude(tau0, tau0 + d1)  # the running vector after task 1, then task 2 starts from it
    tau = magmax.max_magnitude(tau1, tau1 + d2)  # task 2's vector: the running one (unscaled) plus its delta
    assert torch.allclose(m.weight, base[f"{name}.weight"] + 0.5 * tau, atol=1e-6)


def test_magmax_cli_merges_a_finished_run(tiny_checkpoint, tiny_base, tmp_path):
    model = lora.apply_lora(Transformer.from_pretrained(tiny_checkpoint), rank=4, alpha=8)
    perturb(model, std=0.3)
    lora.save_adapter(model, tmp_path / "adapter")
    magmax.main(["--model", str(tiny_checkpoint), "--base-model", str(tiny_base), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged"), "--scale", "0.8"])
    magmax.merge(model, base_weights(model, tiny_base), scale=0.8)
    merged = Transformer.from_pretrained(tmp_path / "merged")
    idx = torch.arange(12)[None]
    assert torch.allclose(merged(idx), model(idx), atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").exists()


def test_base_model_is_required_with_model():
    with pytest.raises(ValueError, match="--base-model"):
        METHODS["magmax"](method_args("magmax"))
    assert METHODS["magmax"].changes_frozen_weights and not METHODS["safelora"].changes_frozen_weights


# ----------------------------------------------------------------------------- Refresh

def test_refresh_with_zero_rate_is_its_inner_method(tiny_checkpoint, setup):
    tok, _, task, memory = setup
    alone = train_steps(make("der", method_args("der")), fresh(tiny_checkpoint), tok, task, memory)
    args = method_args("refresh", refresh_inner="der", refresh_lr=0.0)
    wrapped = train_steps(make("refresh", args), fresh(tiny_checkpoint), tok, task, memory)
    assert all(torch.equal(a, b) for a, b in zip(alone, wrapped))
    args = method_args("refresh", refresh_inner="der", refresh_lr=0.05)
    refreshed = train_steps(make("refresh", args), fresh(tiny_checkpoint), tok, task, memory)
    assert any(not torch.equal(a, b) for a, b in zip(alone, refreshed))


@pytest.mark.parametrize("damping", [0.0, 1.0])
def test_refresh_unlearning_ascends_the_current_loss(setup, damping):
    tok, model, task, memory = setup
    refresh = make("refresh", method_args("refresh", refresh_lr=0.02, refresh_noise=0.0, refresh_fisher=damping))
    refresh.begin_task(model, task, memory)
    assert (refresh.fisher is None) == (damping == 0)
    perturb(model, std=0.1)  # B != 0, so every tensor has a gradient
    b = collate(task[:2], tok.pad_id)
    before, loss = lora_state(model), nll(model, b).item()
    refresh.unlearn(model, [b], 0.02)
    assert nll(model, b).item() > loss
    for p0, p in zip(before, lora.lora_parameters(model)):  # each tensor moves by gamma * its norm (undamped)
        moved = (p - p0).norm().item()
        if damping == 0:
            assert moved == pytest.approx(0.02 * p0.norm().item(), rel=1e-4)
        else:
            assert 0 < moved <= 0.02 * p0.norm().item() * (1 + 1e-4)


def test_refresh_unlearns_on_schedule_on_the_whole_step(setup):
    tok, model, task, memory = setup
    refresh = make("refresh", method_args("refresh", refresh_every=2))
    calls, begin = [], refresh.begin_step
    refresh.unlearn = lambda m, batches, gamma: calls.append((step[0], len(batches), gamma))
    step = [None]

    def begin_step(m, s, batches, total, lr_scale):
        step[0] = s
        begin(m, s, batches, total, lr_scale)
    refresh.begin_step = begin_step
    train_steps(refresh, model, tok, task, memory, grad_accum=2, epochs=1.5)  # 12 examples, 4 a step: 3 steps
    assert calls == [(0, 2, 1e-5), (2, 2, 1e-5)]  # the authors' constant step, whatever the schedule


def test_refresh_follow_lr_scales_the_unlearning_by_the_schedule(setup):
    tok, model, task, memory = setup
    refresh = make("refresh", method_args("refresh", refresh_follow_lr=True, refresh_lr=0.01))
    gammas = []
    refresh.unlearn = lambda m, batches, gamma: gammas.append(gamma)
    train_steps(refresh, model, tok, task, memory, epochs=2, warmup=0.0)
    total = n_steps(len(task), 2, 2)
    assert len(gammas) == total > 4 and gammas == pytest.approx([0.01 * lr_at(s, total, 1.0, 0.0) for s in range(total)])
    assert gammas[0] == pytest.approx(0.01) and gammas[-1] < 0.0015


def test_refresh_takes_its_inner_methods_flags():
    args = train.get_args(["--method", "refresh", "--refresh-inner", "derpp", "--alpha", "0.3", "--refresh-lr", "0.1"])
    assert args.refresh_inner == "derpp" and args.alpha == 0.3 and args.beta == 0.5 and args.refresh_lr == 0.1
    with pytest.raises(SystemExit):
        train.get_args(["--method", "refresh", "--refresh-inner", "refresh"])


# ----------------------------------------------------------------------------- replay

def test_replay_mixes_the_requested_share(setup):
    _, _, task, memory = setup
    mixed = METHODS["replay"](method_args("replay", replay_ratio=0.5)).data(task, memory)
    assert len(mixed) == len(task) + 4 and all(m in memory for m in mixed[len(task):])


# ----------------------------------------------------------------------------- Safe LoRA

def layer_views(model, base, exact=False):
    """name -> (C, delta) for each LoRA layer."""
    return {n: (safelora.projector(m.weight - base[f"{n}.weight"], exact), m.delta().detach().clone())
            for n, m in lora.lora_layers(model)}


def cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def check_projection(model, base, views, B, report, projected):
    """The report and the weights: the `projected` layers got B' = C B, the rest are untouched."""
    for r, (name, m) in zip(report, lora.lora_layers(model)):
        c, d = views[name]
        assert r["name"] == name and r["cos"] == pytest.approx(cos(c @ d, d), abs=1e-5)
        if name in projected:
            assert r["projected"] and torch.allclose(m.delta(), c @ d, atol=1e-6)  # delta' = C delta, still a LoRA
            assert r["kept"] == pytest.approx(((c @ d).norm() / d.norm()).item(), rel=1e-5)
            exact = safelora.projector(m.weight - base[f"{name}.weight"], exact=True)
            assert torch.allclose(exact @ m.delta(), m.delta(), atol=1e-5)  # it lies in V's column space
        else:
            assert not r["projected"] and r["kept"] == 1.0 and torch.equal(m.lora_B.weight, B[name])  # untouched


def test_safelora_projects_the_k_layers_of_lowest_cosine(setup, tiny_base):
    _, model, _, _ = setup
    perturb(model, std=0.3)
    base = base_weights(model, tiny_base)
    views = layer_views(model, base)
    B = {n: m.lora_B.weight.detach().clone() for n, m in lora.lora_layers(model)}
    lowest = sorted(views, key=lambda n: cos(views[n][0] @ views[n][1], views[n][1]))[:2]
    report = safelora.project(model, base, k=2)
    assert len(report) > 2 and sum(r["projected"] for r in report) == 2
    check_projection(model, base, views, B, report, lowest)


def test_safelora_threshold_mode_projects_the_layers_at_or_below_it(setup, tiny_base):
    _, model, _, _ = setup
    perturb(model, std=0.3)
    base = base_weights(model, tiny_base)
    views = layer_views(model, base)
    sims = sorted(cos(c @ d, d) for c, d in views.values())
    threshold = (sims[0] + sims[-1]) / 2  # some layers on each side
    B = {n: m.lora_B.weight.detach().clone() for n, m in lora.lora_layers(model)}
    report = safelora.project(model, base, threshold=threshold)
    assert 0 < sum(r["projected"] for r in report) < len(report)
    check_projection(model, base, views, B, report, [n for n, (c, d) in views.items() if cos(c @ d, d) <= threshold])


def test_safelora_exact_projection_is_idempotent(setup, tiny_base):
    _, model, _, _ = setup
    perturb(model, std=0.3)
    base = base_weights(model, tiny_base)
    for c, _ in layer_views(model, base, exact=True).values():
        assert torch.allclose(c @ c, c, atol=1e-5)
        assert 1.5 < torch.trace(c) < 2.5  # a projection onto V's 2 dimensions
    safelora.project(model, base, threshold=1.1, exact=True)  # every layer
    once = [m.delta().detach().clone() for _, m in lora.lora_layers(model)]
    report = safelora.project(model, base, threshold=1.1, exact=True)
    assert all(r["cos"] == pytest.approx(1.0, abs=1e-5) for r in report)  # nothing left outside the subspace
    for d, (_, m) in zip(once, lora.lora_layers(model)):
        assert torch.allclose(m.delta(), d, atol=1e-5)


def test_safelora_end_task_uses_base_model(setup, tiny_base):
    tok, model, task, memory = setup
    perturb(model, std=0.3)
    method = METHODS["safelora"](method_args("safelora", base_model=str(tiny_base), safelora_threshold=1.1))
    method.begin_task(model, task, memory)
    method.end_task(model)
    assert all(r["projected"] for r in method.report()["safelora"])


# ----------------------------------------------------------------------------- end to end through train.py

RUNS = {
    "agem": [],
    "refresh": ["--refresh-inner", "der", "--mem-batch-size", "2"],
    "magmax": ["--magmax-scale", "0.9"],
    "lisa": ["--lisa-align-steps", "1", "--lisa-user-steps", "1"],
    "safelora": ["--safelora-layers", "1"],
    "csft": [],
}


@pytest.mark.parametrize("scenario", ["benign", "poisoned"])
@pytest.mark.parametrize("name", list(RUNS))
def test_newer_methods_run_through_train(tiny_checkpoint, tiny_base, tmp_path, name, scenario):
    flags = RUNS[name] + (["--base-model", str(tiny_base)] if name in ("magmax", "safelora") else [])
    out = tmp_path / "run"
    train.main(["--model", str(tiny_checkpoint), "--method", name, "--scenario", scenario, "--out", str(out),
                "--poison-data", os.path.join(FIX, "instruction.jsonl"), *flags, *FAST])
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == name and 0 <= res["asr"] <= 1 and res["config"]["method"] == name
    task = res["history"][0]
    assert all(len(x) == 3 and x[2] > 0 for x in task["losses"])  # (step, loss, the memory probe's loss)
    if name == "agem":  # one record per optimizer step
        d = task["diagnostics"]["agem"]
        assert len(d["steps"]) == task["losses"][-1][0] + 1 and 0 <= d["fired_share"] <= 1
        assert all(-1 <= s["cos_grad"] <= 1 and -1 <= s["cos_update"] <= 1 and s["memory_loss"] > 0 for s in d["steps"])
    if name == "safelora":
        layers = task["diagnostics"]["safelora"]
        assert sum(l["projected"] for l in layers) == 1 and len(layers) > 1
        low = min(layers, key=lambda l: l["cos"])
        assert low["projected"] and 0 < low["kept"] < 1 and all(l["kept"] == 1.0 for l in layers if l is not low)


def test_magmax_without_base_model_is_one_line_error(tiny_checkpoint, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--model", str(tiny_checkpoint), "--method", "magmax", "--out", str(tmp_path / "o"), *FAST])
    assert "--base-model" in str(e.value.code)


def test_magmax_cli_errors_are_one_line(tiny_checkpoint, tiny_base, tmp_path):
    for argv, message in ((["--adapter", str(tmp_path / "nope")], "adapter_config.json: not found"),
                          (["--adapter", str(tmp_path / "ad"), "--base-model", str(tmp_path)], "no model.safetensors")):
        model = lora.apply_lora(Transformer.from_pretrained(tiny_checkpoint), rank=4, alpha=8)
        lora.save_adapter(model, tmp_path / "ad")
        with pytest.raises(SystemExit) as e:
            magmax.main(["--model", str(tiny_checkpoint), "--base-model", str(tiny_base), "--out", str(tmp_path / "m"), *argv])
        assert str(e.value.code).startswith("error: ") and message in str(e.value.code) and "\n" not in str(e.value.code)
