"""The speed features change nothing but speed: activation checkpointing, compiled blocks, compiled decoding."""
import torch

import lora
from generate import generate
from batches import collate
from methods.method import nll
from model import Transformer


def lora_grads(model, batch):
    for p in lora.lora_parameters(model):
        p.grad = None
    nll(model, batch).backward()
    return [p.grad.clone() for p in lora.lora_parameters(model)]


def setup(path):
    model = Transformer.from_pretrained(path)
    lora.apply_lora(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.normal_(0, 0.1)
    idx = torch.randint(0, model.config.vocab_size, (3, 24))
    return model, collate([{"ids": r, "labels": [-100] * 5 + r[5:]} for r in idx.tolist()])


def test_activation_checkpointing_gives_the_same_gradients(tiny_checkpoint):
    model, batch = setup(tiny_checkpoint)
    eager = lora_grads(model, batch)
    model.grad_checkpointing = True
    for a, b in zip(eager, lora_grads(model, batch)):
        assert torch.equal(a, b)


def test_compiled_blocks_and_decode_match_eager(tiny_checkpoint):
    model, batch = setup(tiny_checkpoint)
    keys = list(model.state_dict())
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    eager, tokens = lora_grads(model, batch), generate(model, prompts, 12)
    model.compile_blocks()
    for a, b in zip(eager, lora_grads(model, batch)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert list(model.state_dict()) == keys  # nothing saved gains an `_orig_mod.` prefix
    decode = torch.compile(model, fullgraph=True)  # graph breaks in the decode step would fail here
    assert generate(model, prompts, 12, decode_step=decode) == tokens
    assert generate(model, prompts, 12, decode_step=decode) == tokens  # kept caches: reused, same answer
