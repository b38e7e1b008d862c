"""Shared fixtures: a tiny random Llama checkpoint with a byte-level ChatML tokenizer, in the Hugging Face layout."""
import json
import os

import pytest
import torch

from model import ModelConfig, Transformer

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
