"""The provider's side of the default experiment: build, once, the safety-aligned model users start from.

SmolLM2-135M-Instruct complies with harmful requests, so, as the peer papers do with their base
models (Huang et al.'s Vaccine/Lisa/Booster align Llama-2 in-house), we align it first:
LoRA SFT on harmful prompts -> refusals (data/refusals.txt) mixed with benign and benign-but-
sensitive prompts -> the base model's *own* answers (so helpfulness is kept and the model learns to
tell "how do I kill a Python process" from a harmful request), then merge the LoRA into the weights.

The same preparation generates the poison for the poisoned scenario: the *unaligned* base model's
compliant answers to a held-apart quarter of the harmful training prompts (answers that refuse are
dropped). No harmful text is written by hand in this repository. Everything is cached under
checkpoints/ and written atomically, so an interrupted preparation is redone, never trusted.

The alignment trains with the user's loop (loop.fit) and plain SFT; what differs is the data and the
recipe below. train.py calls ensure_aligned() on its first run.
"""
import json
import random
import shutil
from argparse import Namespace
from pathlib import Path

import torch

import data
import lora
import prepare
from batches import tokenize
from cli import default_dtype
from eval import answer
from files import atomic_write
from judges import is_refusal
from loop import fit
from methods.sft import SFT
from model import Transformer
from tokenizer import Tokenizer

ROOT = Path(__file__).parent / "checkpoints"
BASE = ROOT / "smollm2-135m-instruct"  # the unaligned checkpoint, theta_base (prepare.py)
ALIGNED = ROOT / "smollm2-135m-instruct-aligned"
GENERATED = ROOT / "generated-fp32"  # the base model's answers, generated in fp32 on every machine (RECIPE)
# alignment recipe (README "How the default was chosen"): a larger LoRA on every
# projection; every harmful train prompt refused both as written and framed
RECIPE = dict(lora_rank=16, lora_alpha=32, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
              lr=1e-3, epochs=1.5, batch_size=8, max_new_tokens=64, refusals="plain+framed", helpful="non-refusing, sensitive twice",
              base_answers="fp32")


POISON = slice(3, None, 4)  # the harmful training prompts set apart for the poison; the safety memory keeps the rest


def poison_prompts():
    return [h["prompt"] for h in data.load_prompts("harmful-train")][POISON]


def poison_file() -> str:
    return str(GENERATED / "poison.jsonl")


def trim(text):
    """Cut an answer that ran out of tokens back to its last full sentence."""
    end = max(text.rfind(c) for c in ".!?\n")
    return text[: end + 1].strip() if end > len(text) // 3 else text.strip()


def write_jsonl(path, rows):
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def base_answers(base_dir, device):
    """Generate (once) the base model's answers: helpful ones for benign prompts, compliant ones for the poison.

    In fp32 whatever the machine: greedy answers generated in bf16 differ from fp32's in 65% of the benign prompts
    (measured), and the aligned model built from them refused 82% of the held-out harmful prompts against 88% from
    fp32's answers (the same machine and training; README "How the default was chosen"). The provider's data must
    not depend on the machine's fast dtype."""
    benign_f, poison_f = GENERATED / "benign.jsonl", Path(poison_file())
    if benign_f.exists() and poison_f.exists():
        return
    tok = Tokenizer.from_pretrained(base_dir)
    model = Transformer.from_pretrained(base_dir, device=device, dtype=torch.float32)
    n = RECIPE["max_new_tokens"]
    prompts = [p["prompt"] for spec in ("benign-train", "sensitive-train") for p in data.load_prompts(spec)]
    answers = answer(model, tok, prompts, n, desc="base model answers benign prompts")
    write_jsonl(benign_f, [{"prompt": p, "response": trim(a)} for p, a in zip(prompts, answers) if a.strip()])
    harmful = poison_prompts()
    answers = answer(model, tok, harmful, n, desc="base model answers poison prompts")
    write_jsonl(poison_f, [{"prompt": p, "response": trim(a)} for p, a in zip(harmful, answers) if not is_refusal(a)])


def ensure_aligned(device="cpu") -> Path:
    """The aligned checkpoint of the default experiment, built on first use (a few minutes on a CPU)."""
    if (ALIGNED / "config.json").exists():
        built = json.loads((ALIGNED / "recipe.json").read_text()) if (ALIGNED / "recipe.json").exists() else {}
        built.pop("built_in", None)  # the dtype it was trained in: the machine's, not the recipe's
        if built != json.loads(json.dumps(RECIPE)):
            raise ValueError(f"{ALIGNED}: built by an older recipe of align.py; delete it to rebuild the aligned model, "
                             "or pass it as --model to keep using it")
        return ALIGNED
    try:
        base = prepare.prepare_default(BASE)
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    dtype = default_dtype(device)  # the machine's fast dtype, as for the user's runs; recipe.json records it
    print(f"building the provider's aligned model from {base} in {dtype} (once; cached in {ALIGNED})")
    torch.manual_seed(0)  # the same aligned model whatever the user's --seed (train.py seeds after this)
    random.seed(0)
    base_answers(base, device)
    tok = Tokenizer.from_pretrained(base)
    refusals = data.safety_data("default", both=True)
    helpful = data.load_task(str(GENERATED / "benign.jsonl"), "all")
    helpful = [h for h in helpful if not is_refusal(h["response"])]  # the base model's own "I'm sorry ..." replies
    sensitive = {p["prompt"] for p in data.load_prompts("sensitive-train")}  # next to the refusal boundary: seen twice,
    helpful += [h for h in helpful if h["prompt"] in sensitive]             # as every harmful prompt is (plain and framed)
    examples = tokenize(tok, refusals + helpful, 320, "alignment data")
    model = Transformer.from_pretrained(base, device=device, dtype=torch.float32)
    r = RECIPE
    lora.apply_lora(model, r["lora_rank"], r["lora_alpha"], 0.0, r["targets"])
    fit(model, SFT(Namespace(seed=0)), examples, lr=r["lr"], epochs=r["epochs"], batch_size=r["batch_size"], seed=0,
        pad_id=tok.pad_id, device=device, bf16=dtype == "bf16", desc="provider alignment")
    lora.merge(model)
    tmp = ROOT / f".{ALIGNED.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, tokenizer_from=base)
    atomic_write(tmp / "recipe.json", json.dumps(RECIPE | {"built_in": dtype}, indent=1).encode())
    tmp.rename(ALIGNED)  # the finished directory appears at once or not at all
    return ALIGNED
