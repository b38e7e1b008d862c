"""The speed features change nothing but speed: activation checkpointing, compiled blocks, compiled decoding."""
import random

import torch

import lora
from batches import collate
from generate import complete, generate
from methods.method import nll
from model import Transformer
from tokenizer import Tokenizer


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


def test_evaluation_compiles_the_decode_step_once_per_call_and_never_the_blocks(tiny_checkpoint):
    """A graph per batch shape (ragged last batches, cache lengths) hit torch.compile's recompile limit in train.py's
    evaluation on an H200 (fullgraph: a hard error): now every batch of a call has one shape, and the prefill, whose
    length changes with every batch, runs the compiled blocks eagerly (their recompile budget is training's)."""
    torch._dynamo.reset()
    model, tok = Transformer.from_pretrained(tiny_checkpoint), Tokenizer.from_pretrained(tiny_checkpoint)
    lora.apply_lora(model)
    rng = random.Random(0)
    ids = [[rng.randrange(1, 200) for _ in range(rng.randint(3, 100))] for _ in range(23)]  # 5 batches, the last of 3
    eager = complete(model, tok, ids, 6, 5, "eager")
    graphs, block_graphs = [], []
    model.compile_blocks(backend=lambda gm, _: block_graphs.append(gm) or gm.forward)
    decode = torch.compile(model, backend=lambda gm, _: graphs.append(gm) or gm.forward, fullgraph=True)
    assert complete(model, tok, ids, 6, 5, "compiled", decode_step=decode) == eager
    assert len(graphs) == 1 and block_graphs == []
