"""Each method's defining property, and a few training steps of every method on a tiny model."""
import argparse

import pytest
import torch

import lora
from methods import METHODS
from methods.base import collate, nll
from model import Transformer
from tokenizer import Tokenizer


def method_args(name, **kw):
    p = argparse.ArgumentParser()
    METHODS[name].add_args(p)
    args = p.parse_args([])
    args.seed = 0
    vars(args).update(kw)
    return args


def examples(tok, pairs):
    out = []
    for q, a in pairs:
        ids, labels = tok.encode_example([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        out.append({"ids": ids, "labels": labels})
    return out


@pytest.fixture
def setup(tiny_checkpoint):
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    model = lora.apply_lora(Transformer.from_pretrained(tiny_checkpoint), rank=4, alpha=8)
    task = examples(tok, [(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}. The final answer is {2 * i}.") for i in range(8)])
    memory = examples(tok, [("How do I pick a lock?", "I'm sorry, I cannot help with that."),
                            ("Tell me how to hurt someone.", "I cannot assist with that request.")] * 3)
    return tok, model, task, memory


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains(name, setup, tiny_checkpoint):
    tok, model, task, memory = setup
    args = method_args(name)
    if "base_model" in vars(args):  # magmax, safelora need theta_base: the model itself will do for a smoke run
        args.base_model = str(tiny_checkpoint)
    method = METHODS[name](args)
    method.begin_task(model, task, memory)
    data = method.data(task, memory)
    params = lora.lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    before = [p.detach().clone() for p in params]
    for step in range(3):
        loss = method.loss(model, collate(data[step * 2: step * 2 + 2], tok.pad_id))
        assert torch.isfinite(loss)
        loss.backward()
        method.after_backward(model)
        opt.step()
        opt.zero_grad()
    method.end_task(model)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def test_nll_is_mean_over_target_tokens(setup):
    tok, model, task, _ = setup
    b = collate(task[:3], tok.pad_id)
    logits = model(b["idx"])[:, :-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), b["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(nll(model, b), ref, atol=1e-6)


def test_replay_mixes_the_requested_share(setup):
    _, _, task, memory = setup
    mixed = METHODS["replay"](method_args("replay", replay_ratio=0.5)).data(task, memory)
    assert len(mixed) == len(task) + 4 and all(m in memory for m in mixed[len(task):])


@pytest.mark.parametrize("topk", [0, 5])
def test_der_loss_is_zero_when_model_equals_teacher(setup, topk):
    _, model, task, memory = setup
    der = METHODS["der"](method_args("der", der_topk=topk))
    der.begin_task(model, task, memory)  # fresh LoRA: the model is its own teacher
    # exactly zero with the teacher recomputed; with stored top-k, only bf16 rounding is left (rel. 2^-8)
    bound = 0 if topk == 0 else max((2 ** -8 * m["der_values"].float().abs().max()) ** 2 for m in memory[:3])
    assert der.logit_loss(model, memory[:3]).item() <= bound + 1e-12
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.normal_(0, 0.5)
    assert der.logit_loss(model, memory[:3]).item() > 1e-4


def test_der_stores_compact_topk(setup):
    _, model, task, memory = setup
    der = METHODS["der"](method_args("der", der_topk=5))
    der.begin_task(model, task, memory)
    n_targets = sum(l != -100 for l in memory[0]["labels"][1:])
    assert memory[0]["der_values"].shape == (n_targets, 5) and memory[0]["der_values"].dtype == torch.bfloat16
