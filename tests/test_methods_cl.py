"""The defining property of Refresh, MagMax, Lisa, SafeLoRA and constrained SFT on the tiny model, and
each of them end to end through train.main in both scenarios."""
import argparse
import json
import os

import pytest
import torch

import lora
import methods.magmax as magmax
import methods.safelora as safelora
import train
from methods import METHODS
from methods.base import base_weights, collate, nll
from model import Transformer
from test_methods import method_args, setup  # noqa: F401 (fixture)
from test_train import FAST, FIX


def perturb(model, std=0.5, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.normal_(0, std)


@pytest.fixture(scope="module")
def tiny_base(tiny_checkpoint, tmp_path_factory):
    """An 'unaligned base' for the tiny checkpoint: each matrix minus a random rank-2 matrix (so V has rank 2)."""
    model = Transformer.from_pretrained(tiny_checkpoint)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p -= 0.3 * torch.randn(p.shape[0], 2) @ torch.randn(2, p.shape[1]) / p.shape[1] ** 0.5
            else:
                p -= 0.05 * torch.randn_like(p)
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path, tokenizer_from=tiny_checkpoint)
    return path


def grads(loss, model):
    return torch.autograd.grad(loss, lora.lora_parameters(model))


def lora_state(model):
    return [p.detach().clone() for p in lora.lora_parameters(model)]


# ----------------------------------------------------------------------------- MagMax

def test_magmax_keeps_the_larger_magnitude_entry_and_scales(setup, tiny_base):
    _, model, _, _ = setup
    perturb(model, std=0.3)
    base = base_weights(model, tiny_base)
    layers = dict(lora.lora_layers(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    deltas = {f"{n}.weight": m.delta().detach().clone() for n, m in layers.items()}
    s = 0.7
    magmax.merge(model, base, scale=s)
    picked_user = picked_safe = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        tau_safe = before[name] - base[name]
        if name in deltas:  # a LoRA'd weight: per entry the larger of tau_safe and delta
            d = deltas[name]
            user = d.abs() > tau_safe.abs()
            picked_user, picked_safe = picked_user + int(user.sum()), picked_safe + int((~user).sum())
            expected = base[name] + s * torch.where(user, d, tau_safe)
        else:  # no LoRA: tau_user = 0, the entry is W_base + s * tau_safe
            expected = base[name] + s * tau_safe
        assert torch.allclose(p, expected, atol=1e-6), name
    assert picked_user > 0 and picked_safe > 0  # both sides won somewhere: the test saw a real choice
    assert all(not m.lora_B.weight.any() for m in layers.values())  # the delta now lives in the weights


def test_magmax_of_several_tasks_scales_once(setup, tiny_base):
    _, model, _, _ = setup
    base = base_weights(model, tiny_base)
    name, m = lora.lora_layers(model)[0]
    w0 = m.weight.detach().clone()
    perturb(model, std=0.3, seed=1)
    d1 = m.delta().detach().clone()
    magmax.merge(model, base, scale=0.5)
    perturb(model, std=0.3, seed=2)
    d2 = m.delta().detach().clone()
    magmax.merge(model, base, scale=0.5, prior_scale=0.5)
    tau = magmax.max_magnitude(magmax.max_magnitude(w0 - base[f"{name}.weight"], d1), d2)
    assert torch.allclose(m.weight, base[f"{name}.weight"] + 0.5 * tau, atol=1e-6)


def test_magmax_cli_merges_a_finished_run(tiny_checkpoint, tiny_base, tmp_path):
    model = lora.apply_lora(Transformer.from_pretrained(tiny_checkpoint), rank=4, alpha=8)
    perturb(model, std=0.3)
    lora.save_adapter(model, tmp_path / "adapter")
    magmax.main(["--model", str(tiny_checkpoint), "--base", str(tiny_base), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged"), "--scale", "0.8"])
    magmax.merge(model, base_weights(model, tiny_base), scale=0.8)
    merged = Transformer.from_pretrained(tmp_path / "merged")
    idx = torch.arange(12)[None]
    assert torch.allclose(merged(idx), model(idx), atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").exists()


def test_base_model_is_required_with_model():
    args = method_args("magmax", model="some/aligned")
    with pytest.raises(ValueError, match="--base-model"):
        METHODS["magmax"](args)
    assert METHODS["magmax"].changes_base_weights and not METHODS["safelora"].changes_base_weights


# ----------------------------------------------------------------------------- SafeLoRA

def layer_views(model, base, exact=False):
    """name -> (C, delta) for each LoRA layer."""
    return {n: (safelora.projector(m.weight - base[f"{n}.weight"], exact), m.delta().detach().clone())
            for n, m in lora.lora_layers(model)}


def cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_safelora_projects_only_layers_below_the_threshold(setup, tiny_base):
    _, model, _, _ = setup
    perturb(model, std=0.3)
    base = base_weights(model, tiny_base)
    views = layer_views(model, base)
    sims = sorted(cos(c @ d, d) for c, d in views.values())
    threshold = (sims[0] + sims[-1]) / 2  # some layers on each side
    B = {n: m.lora_B.weight.detach().clone() for n, m in lora.lora_layers(model)}
    report = safelora.project(model, base, threshold)
    assert 0 < sum(r["projected"] for r in report) < len(report)
    for r, (name, m) in zip(report, lora.lora_layers(model)):
        c, d = views[name]
        assert r["name"] == name and r["cos"] == pytest.approx(cos(c @ d, d), abs=1e-6)
        if r["cos"] < threshold:
            assert r["projected"] and torch.allclose(m.delta(), c @ d, atol=1e-6)  # delta' = C delta, still a LoRA
            exact = safelora.projector(m.weight - base[f"{name}.weight"], exact=True)
            assert torch.allclose(exact @ m.delta(), m.delta(), atol=1e-5)  # it lies in V's column space
        else:
            assert not r["projected"] and torch.equal(m.lora_B.weight, B[name])  # untouched


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
    assert all(r["projected"] for r in method.report)


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
    qi = -(2 / beta * torch.nn.functional.logsigmoid(beta * (logp - logp_safe))).sum() / b["norm"]
    for g, g_qi in zip(grads(csft.loss(model, b), model), grads(qi, model)):
        assert torch.allclose(g, g_qi, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(csft.loss(model, b), nll(model, b))


# ----------------------------------------------------------------------------- Refresh

def refresh_args(base, **kw):
    p = argparse.ArgumentParser()
    METHODS["refresh"].add_args(p)
    METHODS[base].add_args(p)
    args = p.parse_args(["--base", base])
    args.seed = 0
    vars(args).update(kw)
    return args


def run_steps(method, model, tok, task, memory, steps=3, accum=1):
    method.begin_task(model, task, memory)
    data = method.data(task, memory)
    opt = torch.optim.AdamW(lora.lora_parameters(model), lr=1e-2)
    for step in range(steps):
        for m in range(accum):
            i = (step * accum + m) * 2
            chunk = [data[(i + k) % len(data)] for k in range(2)]
            method.loss(model, collate(chunk, tok.pad_id, frac=1 / accum)).backward()
        method.after_backward(model)
        opt.step()
        opt.zero_grad()
    method.end_task(model)
    return lora_state(model)


def fresh_setup(tiny_checkpoint, setup):
    tok, _, task, memory = setup
    torch.manual_seed(0)
    return tok, lora.apply_lora(Transformer.from_pretrained(tiny_checkpoint), rank=4, alpha=8), task, memory


def test_refresh_with_zero_rate_is_its_base(tiny_checkpoint, setup):
    tok, model, task, memory = fresh_setup(tiny_checkpoint, setup)
    alone = run_steps(METHODS["der"](method_args("der")), model, tok, task, memory)
    tok, model, task, memory = fresh_setup(tiny_checkpoint, setup)
    wrapped = run_steps(METHODS["refresh"](refresh_args("der", refresh_lr=0.0)), model, tok, task, memory)
    assert all(torch.equal(a, b) for a, b in zip(alone, wrapped))
    tok, model, task, memory = fresh_setup(tiny_checkpoint, setup)
    refreshed = run_steps(METHODS["refresh"](refresh_args("der", refresh_lr=0.05)), model, tok, task, memory)
    assert any(not torch.equal(a, b) for a, b in zip(alone, refreshed))


@pytest.mark.parametrize("damping", [0.0, 1.0])
def test_refresh_unlearning_ascends_the_current_loss(setup, damping):
    tok, model, task, memory = setup
    refresh = METHODS["refresh"](refresh_args("sft", refresh_lr=0.02, refresh_noise=0.0, refresh_fisher=damping))
    refresh.begin_task(model, task, memory)
    assert (refresh.fisher is None) == (damping == 0)
    perturb(model, std=0.1)  # B != 0, so every tensor has a gradient
    b = collate(task[:2], tok.pad_id)
    before, loss = lora_state(model), nll(model, b).item()
    refresh.unlearn(model, b)
    assert nll(model, b).item() > loss
    for p0, p in zip(before, lora.lora_parameters(model)):  # each tensor moves by gamma * its norm (undamped)
        moved = (p - p0).norm().item()
        if damping == 0:
            assert moved == pytest.approx(0.02 * p0.norm().item(), rel=1e-4)
        else:
            assert 0 < moved <= 0.02 * p0.norm().item() * (1 + 1e-4)


def test_refresh_unlearns_on_schedule_once_per_step(setup, monkeypatch):
    tok, model, task, memory = setup
    refresh = METHODS["refresh"](refresh_args("sft", refresh_every=2))
    calls = []
    monkeypatch.setattr(refresh, "unlearn", lambda m, b: calls.append(refresh.step))
    run_steps(refresh, model, tok, task, memory, steps=3, accum=2)
    assert calls == [0, 2]


def test_refresh_takes_its_base_methods_flags():
    args = train.get_args(["--method", "refresh", "--base", "derpp", "--alpha", "0.3", "--refresh-lr", "0.1"])
    assert args.base == "derpp" and args.alpha == 0.3 and args.beta == 0.5 and args.refresh_lr == 0.1
    with pytest.raises(SystemExit):
        train.get_args(["--method", "refresh", "--base", "refresh"])


# ----------------------------------------------------------------------------- Lisa

def test_lisa_alternates_states_on_schedule(setup):
    tok, model, task, memory = setup
    lisa = METHODS["lisa"](method_args("lisa", lisa_align_steps=2, lisa_user_steps=3, lisa_rho=0.0))
    lisa.begin_task(model, task, memory)
    states = []
    for step in range(10):
        for _ in range(2):  # two micro-batches: the state holds for the whole step
            b = collate(task[:2], tok.pad_id, frac=0.5)
            rng = lisa.rng.getstate()
            loss = lisa.loss(model, b)
            states.append(lisa.state)
            if lisa.state == "align":  # the user batch is replaced by a memory batch of its size
                lisa.rng.setstate(rng)
                assert torch.allclose(loss, 0.5 * nll(model, collate(lisa.sample_memory(2))))
            else:
                assert torch.allclose(loss, nll(model, b))
        lisa.after_backward(model)
    assert states[::2] == states[1::2] == ["align"] * 2 + ["user"] * 3 + ["align"] * 2 + ["user"] * 3


def test_lisa_proximal_term_is_zero_at_the_switch_and_grows_with_drift(setup):
    tok, model, task, memory = setup
    rho = 2.0
    lisa = METHODS["lisa"](method_args("lisa", lisa_align_steps=1, lisa_user_steps=1, lisa_rho=rho))
    lisa.begin_task(model, task, memory)
    b = collate(task[:2], tok.pad_id)
    lisa.loss(model, b)  # step 0, the alignment state begins: w_switch = w
    assert lisa.state == "align" and lisa.proximal(model).item() == 0
    drifts = []
    for _ in range(3):
        with torch.no_grad():
            for p in lora.lora_parameters(model):
                p.add_(0.01)
        drifts.append(lisa.proximal(model).item())
    n = sum(p.numel() for p in lora.lora_parameters(model))
    assert drifts == pytest.approx([n * 0.01 ** 2, n * 0.02 ** 2, n * 0.03 ** 2], rel=1e-3)
    lisa.after_backward(model)
    loss = lisa.loss(model, b)  # step 1: the user state begins at the drifted weights, so the term is 0 again
    assert lisa.state == "user" and lisa.proximal(model).item() == 0 and torch.equal(loss, nll(model, b))
    with torch.no_grad():
        lora.lora_parameters(model)[0].add_(0.1)
    assert torch.allclose(lisa.loss(model, b) - nll(model, b), rho / 2 * lisa.proximal(model))
    assert lisa.proximal(model).item() > 0


# ----------------------------------------------------------------------------- end to end

RUNS = {
    "refresh": ["--base", "der", "--mem-batch-size", "2"],
    "magmax": ["--magmax-scale", "0.9"],
    "lisa": ["--lisa-align-steps", "1", "--lisa-user-steps", "1"],
    "safelora": [],
    "csft": [],
}


@pytest.mark.parametrize("scenario", ["benign", "poisoned"])
@pytest.mark.parametrize("name", list(RUNS))
def test_new_methods_run_through_train(tiny_checkpoint, tiny_base, tmp_path, name, scenario):
    flags = RUNS[name] + (["--base-model", str(tiny_base)] if name in ("magmax", "safelora") else [])
    out = tmp_path / "run"
    train.main(["--model", str(tiny_checkpoint), "--method", name, "--scenario", scenario, "--out", str(out),
                "--poison-data", os.path.join(FIX, "instruction.jsonl"), *flags, *FAST])
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == name and 0 <= res["asr"] <= 1 and res["config"]["method"] == name


def test_magmax_without_base_model_is_one_line_error(tiny_checkpoint, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--model", str(tiny_checkpoint), "--method", "magmax", "--out", str(tmp_path / "o"), *FAST])
    assert "--base-model" in str(e.value.code)
