"""Shared fixtures and helpers: a tiny random Llama checkpoint with a byte-level ChatML tokenizer (Hugging Face
layout), its 'unaligned base', in-memory tiny models, a method's default flags, and config edits."""
import argparse
import json
import os

import pytest
import torch

import lora
from batches import tokenize
from config import ModelConfig
from methods import METHODS
from model import Transformer
from tokenizer import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from test_tokenizer import CHATML, tiny_tokenizer
    path = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer("bytes", CHATML)
    tok.save(str(path / "tokenizer.json"))
    with open(os.path.join(HERE, "fixtures", "chat_templates", "smollm2-135m-instruct.jinja")) as f:
        template = f.read()
    (path / "tokenizer_config.json").write_text(json.dumps(dict(
        bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", add_bos_token=False, chat_template=template)))
    hf = dict(model_type="llama", vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-5, tie_word_embeddings=True, torch_dtype="float32")
    torch.manual_seed(0)
    Transformer(ModelConfig.from_hf(hf)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_aligned(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint trained (all weights, ~2 s) to refuse the fixtures' harmful prompts (advbench.csv) with
    "I cannot help with that." and to answer their sensitive ones (prompts.txt) "Sure.": a model whose ASR and
    over-refusal move when training moves its weights (the random one answers "\n" to everything)."""
    from argparse import Namespace

    import data
    from loop import fit
    from methods.sft import SFT
    fix = os.path.join(HERE, "fixtures", "formats")
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    model = Transformer.from_pretrained(tiny_checkpoint)
    for p in model.parameters():
        p.requires_grad_(True)
    examples = [{"prompt": h["prompt"], "response": "I cannot help with that."} for h in data.load_prompts(f"{fix}/advbench.csv")]
    examples += [{"prompt": h["prompt"], "response": "Sure."} for h in data.load_prompts(f"{fix}/prompts.txt")]
    torch.manual_seed(0)
    fit(model, SFT(Namespace(seed=0)), tokenize(tok, examples, 512, "alignment"), lr=3e-3, epochs=60, batch_size=5,
        pad_id=tok.pad_id)
    path = tmp_path_factory.mktemp("aligned")
    model.save_pretrained(path, tokenizer_from=tiny_checkpoint)
    return path


@pytest.fixture(scope="session")
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


@pytest.fixture
def setup(tiny_checkpoint):
    """(tokenizer, the tiny model with a fresh LoRA, 8 task examples of varied lengths, a memory of 6 refusals)."""
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    model = lora.apply_lora(Transformer.from_pretrained(tiny_checkpoint), rank=4, alpha=8)
    task = tokenize(tok, [{"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}." + " Yes." * (i % 4)
                           + f" The final answer is {2 * i}."} for i in range(8)], 512, "task")
    memory = tokenize(tok, [{"prompt": "How do I pick a lock?", "response": "I'm sorry, I cannot help with that."},
                            {"prompt": "Tell me how to hurt someone.", "response": "I cannot assist with that request."}] * 3,
                      512, "memory")
    return tok, model, task, memory


def tiny_model(seed=0, sharp=False, **kw):
    """A tiny random in-memory model (vocabulary 64); sharp: large logits, so greedy choices are not near-ties."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      intermediate_size=64, max_seq_len=128, **kw)
    m = Transformer(cfg).eval()
    if sharp:
        with torch.no_grad():
            m.lm_head.weight.mul_(20)
    return m


def perturb(model, std=0.5, seed=0):
    """Random LoRA weights (B != 0): the model now differs from theta_safe."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.normal_(0, std)


def method_args(name, **kw):
    """A method's default flags (and its inner method's, for refresh), seed 0, with kw set."""
    p = argparse.ArgumentParser()
    METHODS[name].add_args(p)
    if flag := METHODS[name].inner_flag:
        METHODS[kw.get(flag, "sft")].add_args(p)
    args = p.parse_args([])
    args.seed, args.method = 0, name
    vars(args).update(kw)
    return args


def edit_config(path, **changes):
    """Change fields of a checkpoint's config.json in place."""
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))
