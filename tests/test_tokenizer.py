"""tokenizer.py against transformers' apply_chat_template on the real chat templates of each family.

Each family gets a tiny BPE tokenizer trained here on the test conversations, with that family's special
tokens, saved as tokenizer.json + tokenizer_config.json (holding the real template from
tests/fixtures/chat_templates, see the README there) so that both our Tokenizer.from_pretrained and
transformers' AutoTokenizer load the same checkpoint directory.
"""
import functools
import json
import os

import pytest
from tokenizers import Tokenizer as HFTok, decoders, models, normalizers, pre_tokenizers, trainers

from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = os.path.join(ROOT, "tests", "fixtures", "chat_templates")
SMOLLM2 = os.path.join(ROOT, "checkpoints", "smollm2-135m-instruct")
DATE = "26 Jul 2024"  # transformers would render today's date in Llama-3.2's template; we pin the fallback

S, U, A = ("system", "user", "assistant")
msg = lambda role, content: {"role": role, "content": content}
CONVS = [
    [msg(U, "Hello, who are you?")],
    [msg(S, "You are a helpful assistant."), msg(U, "Hi")],
    [msg(U, "What is 2+2?"), msg(A, "4"), msg(U, "And 3+3?")],
    [msg(U, "Tell me a joke."), msg(A, "Why did the chicken cross the road?")],
    [msg(S, "Be brief."), msg(U, "Name a color."), msg(A, "Blue."), msg(U, "Another?"), msg(A, "Red.")],
    [msg(S, "  Be nice.\n"), msg(U, "\n  How do I bake bread?  \n"),
     msg(A, "  Mix flour and water.\n\nThen bake.  \n")],
    [msg(U, "How do I pick a lock?"), msg(A, "\nI can't help with that.\n"), msg(U, " Why not? ")],
    [msg(U, " Hi "), msg(A, " Hello! "), msg(U, "Bye\n"), msg(A, "Goodbye.\n")],
]
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SP = dict(bos_token="<s>", eos_token="</s>")
GEMMA = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
QWEN = dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
# name: (template file, tokenizer style, special tokens, tokenizer_config fields, format, end-of-turn marker)
FAMILIES = {
    "llama2": ("llama2-7b-chat-hf", "sp", ["<s>", "</s>"], SP, "llama2", " </s>"),
    "llama3": ("meta-llama-3-8b-instruct", "bytes", LLAMA3,
               dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"), "llama3", "<|eot_id|>"),
    "llama3.1": ("llama-3.1-8b-instruct", "bytes", LLAMA3,
                 dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"), "llama3", "<|eot_id|>"),
    "llama3.2": ("llama-3.2-1b-instruct", "bytes", LLAMA3,
                 dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"), "llama3", "<|eot_id|>"),
    "mistral": ("mistral-7b-instruct-v0.2", "sp", ["<s>", "</s>"], SP, "mistral", "</s>"),
    "mistral-v3": ("mistral-large-instruct-2407", "sp", ["<s>", "</s>", "[INST]", "[/INST]"], SP, "mistral", "</s>"),
    "mixtral": ("mixtral-8x7b-instruct-v0.1", "sp", ["<s>", "</s>"], SP, "mistral", "</s>"),
    "gemma": ("gemma-2b-it", "sp", GEMMA,
              dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"), "gemma", "<end_of_turn>"),
    "gemma2": ("gemma-2-2b-it", "sp", GEMMA, dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"), "gemma", "<end_of_turn>"),
    "gemma3": ("gemma-3-it", "sp", GEMMA + ["<start_of_image>"], dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"),
               "gemma3", "<end_of_turn>"),
    "qwen2": ("qwen2-0.5b-instruct", "bytes", CHATML, QWEN, "chatml", "<|im_end|>"),
    "qwen3": ("qwen3-0.6b", "bytes", CHATML + ["<think>", "</think>"], QWEN, "qwen3", "<|im_end|>"),
    "qwen2.5": ("qwen2.5-0.5b-instruct", "bytes", CHATML, QWEN, "chatml", "<|im_end|>"),
    "smollm2": ("smollm2-135m-instruct", "bytes", CHATML,
                dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", add_bos_token=False),
                "chatml", "<|im_end|>"),
}


def tiny_tokenizer(style, specials):
    """A small BPE in the style of the family: byte-level (GPT-2/Llama-3/Qwen) or SentencePiece-like."""
    if style == "bytes":
        tok = HFTok(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # Llama-2's tokenizer.json: prepend "▁", spaces become "▁", no pre-tokenizer
        tok = HFTok(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        alphabet = []
    corpus = [m["content"] for c in CONVS for m in c] + [
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face. Cutting Knowledge Date: December 2023",
        "Today Date user system assistant model 0123456789"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"], initial_alphabet=alphabet)
    tok.train_from_iterator(corpus * 3, trainer)
    tok.add_special_tokens(specials)
    return tok


def make_checkpoint(root, family, config=None, generation_config=None, **overrides):
    name, style, specials, fields, _, _ = FAMILIES[family]
    path = os.path.join(root, family)
    os.makedirs(path, exist_ok=True)
    tiny_tokenizer(style, specials).save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(TEMPLATES, name + ".jinja")) as f:
        cfg = dict(tokenizer_class="PreTrainedTokenizerFast", chat_template=f.read())
    cfg.update(fields, **overrides)
    files = {"tokenizer_config.json": cfg, "config.json": config, "generation_config.json": generation_config}
    for fname, obj in files.items():
        if obj is not None:
            with open(os.path.join(path, fname), "w") as f:
                json.dump(obj, f)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {f: make_checkpoint(root, f) for f in FAMILIES}


@functools.lru_cache(maxsize=None)
def hf_tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def hf_apply(path, messages, gen, tokenize, enable_thinking=False):
    """transformers' rendering, or None where the template raises (e.g. Gemma given a system message). Qwen3 with
    thinking off (enable_thinking=False, our default; other templates ignore it), or on (None: left undefined)."""
    kw = {} if enable_thinking is None else dict(enable_thinking=enable_thinking)
    try:
        out = hf_tokenizer(path).apply_chat_template(messages, add_generation_prompt=gen, tokenize=tokenize,
                                                     date_string=DATE, **kw)
    except Exception:
        return None
    return out if not tokenize or isinstance(out, list) else out["input_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_render_and_ids_match_transformers(ckpts, family):
    tok = Tokenizer.from_pretrained(ckpts[family])
    assert tok.chat_format == FAMILIES[family][4]
    for conv in CONVS:
        for gen in (False, True):
            want = hf_apply(ckpts[family], conv, gen, tokenize=False)
            if want is None:  # the template refuses this conversation: so must we
                with pytest.raises(ValueError):
                    tok.render(conv, gen)
                continue
            assert tok.render(conv, add_generation_prompt=gen) == want, (family, conv, gen)
            assert tok.encode_chat(conv, add_generation_prompt=gen) == hf_apply(ckpts[family], conv, gen, tokenize=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_example_labels_exactly_the_answers(ckpts, family):
    tok = Tokenizer.from_pretrained(ckpts[family])
    end, strip = FAMILIES[family][5], family not in ("mistral", "mixtral", "qwen2", "qwen2.5", "qwen3", "smollm2")
    checked = 0
    for conv in CONVS:
        if conv[-1]["role"] != A or hf_apply(ckpts[family], conv, False, tokenize=False) is None:
            continue
        ids, labels = tok.encode_example(conv)
        assert ids == tok.encode_chat(conv, add_generation_prompt=False)
        assert len(labels) == len(ids) and all(l in (-100, i) for i, l in zip(ids, labels))
        # Labelled tokens form one run per assistant turn, covering its content and end-of-turn marker;
        # at most some whitespace of the template is taken in by a token that straddles the start.
        enc, text = tok.tok.encode(tok.render(conv), add_special_tokens=False), tok.render(conv)
        runs, start = [], None
        for i, l in enumerate(labels + [-100]):
            if l != -100 and start is None:
                start = i
            elif l == -100 and start is not None:
                runs.append(text[enc.offsets[start][0]:enc.offsets[i - 1][1]])
                start = None
        answers = [m["content"] for m in conv if m["role"] == A]
        assert len(runs) == len(answers), (family, runs)
        for run, answer in zip(runs, answers):
            target = (answer.strip() if strip else answer) + end
            assert run.endswith(target) and not run[: -len(target)].strip(), (family, run, target)
        checked += 1
    assert checked >= (2 if family in ("gemma", "gemma2", "mixtral") else 4)


THINK = [[msg(U, "What is 2+2?"), msg(A, "<think>\nAdd them.\n</think>\n\n4"), msg(U, "And 3+3?")],
         [msg(S, "Be brief."), msg(U, "What is 2+2?"), msg(A, "<think>\nAdd.\n</think>\n\n4"), msg(U, "3+3?"),
          msg(A, "<think>\n\nAdd again.\n\n</think>\n\n\n6")],
         [msg(U, "Hi"), msg(A, "Hello"), msg(U, "Bye"), msg(A, "<think></think>Goodbye.")]]


def test_qwen3_thinking_off_by_default_and_kept_on_request(ckpts):
    """Qwen3's <think> block as its template renders it: the generation prompt with thinking off (ours by default,
    enable_thinking=False) and on (--thinking, enable_thinking left undefined); reasoning after the last user turn is
    shown, and learned with the answer; earlier answers lose theirs."""
    off, on = Tokenizer.from_pretrained(ckpts["qwen3"]), Tokenizer.from_pretrained(ckpts["qwen3"], thinking=True)
    for conv in CONVS + THINK:
        for gen in (False, True):
            for tok, flag in ((off, False), (on, None)):
                assert tok.render(conv, gen) == hf_apply(ckpts["qwen3"], conv, gen, False, flag), (conv, gen, flag)
                assert tok.encode_chat(conv, gen) == hf_apply(ckpts["qwen3"], conv, gen, True, flag)
    assert off.render([msg(U, "Hi")], True).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.render([msg(U, "Hi")], True).endswith("<|im_start|>assistant\n")
    ids, labels = off.encode_example(THINK[1])
    learned = off.decode([i for i, l in zip(ids, labels) if l != -100], skip_special=False)
    assert learned == "4<|im_end|><think>\nAdd again.\n</think>\n\n6<|im_end|>"
    ids, labels = off.encode_example(CONVS[3])  # no reasoning: the empty block is the prompt's, as at generation
    assert off.decode([i for i, l in zip(ids, labels) if l != -100], skip_special=False) == \
        "Why did the chicken cross the road?<|im_end|>"
    with pytest.raises(ValueError, match="--thinking"):
        Tokenizer.from_pretrained(ckpts["qwen2.5"], thinking=True)


def test_stop_ids_bos_and_pad(tmp_path):
    llama3 = Tokenizer.from_pretrained(make_checkpoint(tmp_path, "llama3", generation_config={"eos_token_id": [5, 6]}))
    ids = lambda t, *toks: {t.tok.token_to_id(x) for x in toks}
    assert llama3.stop_ids == ids(llama3, "<|end_of_text|>", "<|eot_id|>") | {5, 6}  # generation_config's list too
    gemma = Tokenizer.from_pretrained(make_checkpoint(tmp_path, "gemma"))
    assert gemma.stop_ids == ids(gemma, "<eos>", "<end_of_turn>") and gemma.pad_id == ids(gemma, "<pad>").pop()
    qwen = Tokenizer.from_pretrained(make_checkpoint(tmp_path, "qwen2.5"))
    assert qwen.stop_ids == ids(qwen, "<|im_end|>") and qwen.bos_id is None and not qwen.add_bos
    assert qwen.default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    llama2 = make_checkpoint(tmp_path, "llama2", bos_token={"content": "<s>", "lstrip": False})  # the dict form
    llama2 = Tokenizer.from_pretrained(llama2)
    assert llama2.stop_ids == {llama2.eos_id} and llama2.pad_id == llama2.eos_id  # no pad_token: pad with eos
    assert llama2.bos_id == llama2.tok.token_to_id("<s>") and llama2.add_bos
    # bos comes once, from the template text; asking encode for it again does not double it.
    conv = CONVS[1]
    chat = llama2.encode_chat(conv)
    assert chat[0] == llama2.bos_id and chat[1] != llama2.bos_id
    assert llama2.encode(llama2.render(conv), bos=True) == chat
    assert llama2.encode("Hello", bos=True)[0] == llama2.bos_id and llama2.bos_id not in llama2.encode("Hello")
    smol = Tokenizer.from_pretrained(make_checkpoint(tmp_path, "smollm2"))
    assert not smol.add_bos and smol.encode_chat(conv)[0] == smol.tok.token_to_id("<|im_start|>")
    assert smol.decode(smol.encode("Hello <|im_end|>")) == "Hello "
    assert smol.decode(smol.encode("<|im_end|>"), skip_special=False) == "<|im_end|>"


def test_detection_override_and_fallbacks(tmp_path):
    llama3 = make_checkpoint(tmp_path, "llama3")
    assert Tokenizer.from_pretrained(llama3, chat_format="chatml").chat_format == "chatml"
    with pytest.raises(ValueError, match="--chat-format"):
        Tokenizer.from_pretrained(llama3, chat_format="vicuna")
    # No chat_template: the family's special tokens, then config.json's model_type, suggest a format; it is used
    # only when asked for (a silent guess could train in the wrong format)
    smol = make_checkpoint(tmp_path / "a", "smollm2", config={"model_type": "llama"}, chat_template=None)
    with pytest.raises(ValueError, match="no chat_template; its tokens and model_type suggest the 'chatml' format: pass --chat-format chatml"):
        Tokenizer.from_pretrained(smol)
    assert Tokenizer.from_pretrained(smol, chat_format="chatml").chat_format == "chatml"
    for family, fmt in (("qwen3", "qwen3"), ("gemma3", "gemma3"), ("gemma2", "gemma")):  # their tokens say which
        path = make_checkpoint(tmp_path / family, family, config={"model_type": "llama"}, chat_template=None)
        with pytest.raises(ValueError, match=f"suggest the '{fmt}' format"):
            Tokenizer.from_pretrained(path)
    for model_type, fmt in (("llama", "llama2"), ("mistral", "mistral"), ("gemma", "gemma"), ("gemma2", "gemma"),
                            ("gemma3_text", "gemma3"), ("qwen3", "qwen3")):
        path = make_checkpoint(tmp_path / model_type, "llama2", config={"model_type": model_type}, chat_template=None)
        with pytest.raises(ValueError, match=f"suggest the '{fmt}' format: pass --chat-format {fmt}"):
            Tokenizer.from_pretrained(path)
    for config, template in (({"model_type": "phi3"}, None), ({"model_type": "llama"}, "{{ messages[0]['content'] }}")):
        path = make_checkpoint(tmp_path / "x", "llama2", config=config, chat_template=template)
        with pytest.raises(ValueError, match="tokenizer_config.json"):
            Tokenizer.from_pretrained(path)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(make_checkpoint(tmp_path, "llama2", eos_token="<|not_a_token|>"))
    gemma = Tokenizer.from_pretrained(make_checkpoint(tmp_path, "gemma"))
    with pytest.raises(ValueError, match="system"):
        gemma.render(CONVS[1])
    llama2 = Tokenizer.from_pretrained(make_checkpoint(tmp_path, "llama2"))
    with pytest.raises(ValueError, match="alternate"):
        llama2.render([msg(U, "a"), msg(U, "b")])
    with pytest.raises(ValueError, match="assistant"):
        llama2.encode_example(CONVS[0])


@pytest.mark.skipif(not os.path.exists(os.path.join(SMOLLM2, "tokenizer.json")), reason="no SmolLM2 checkpoint")
def test_real_smollm2_checkpoint():
    from transformers import AutoTokenizer
    tok, hf = Tokenizer.from_pretrained(SMOLLM2), AutoTokenizer.from_pretrained(SMOLLM2)
    assert tok.chat_format == "chatml" and tok.vocab_size == len(hf)
    assert tok.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert tok.stop_ids == {hf.convert_tokens_to_ids("<|im_end|>")} and not tok.add_bos
    for conv in CONVS:
        for gen in (False, True):
            want = hf.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True)
            want = want if isinstance(want, list) else want["input_ids"]
            assert tok.encode_chat(conv, add_generation_prompt=gen) == want
    ids, labels = tok.encode_example(CONVS[4])
    answers = tok.decode([i for i, l in zip(ids, labels) if l != -100], skip_special=False)
    assert answers == "Blue.<|im_end|>Red.<|im_end|>"
