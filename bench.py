"""Throughput of our LoRA training step and our generation against Hugging Face transformers + PEFT.

    python bench.py                                   # the default checkpoint, the experiment's own work
    python bench.py --workload random                 # random token batches, every position a target
    python bench.py --model DIR --dtype bf16          # any Hugging Face checkpoint
    python bench.py --config llama-1b --device cuda   # random weights of a known shape (timing only)
    python bench.py --end-to-end                      # the default user run, ours vs transformers + PEFT
    python bench.py --suite gpu                       # the GPU figures of BENCHMARKS.md, one JSON file

Both sides run in this one process on the same weights (a random config is saved to a temporary
checkpoint that both load) and on the same batches; training is a LoRA step (r 8 on q_proj and
v_proj, AdamW, grad clipping). The workloads:
- experiment (default): what a default run does. Training batches are the default task's chat
  examples (tickets, 200, seed 0), the loss on the response tokens only, in loop.fit's length-grouped
  order, --batch-size 8 as train.py; HF gets them as its users pass them (input_ids, attention_mask,
  labels with -100). Generation is the evaluation's prompt mix (harmful, sensitive and task prompts in
  the proportions 310 : 114 : 200), its answer lengths (32 tokens; the task's 40), its stop tokens and
  its batches (longest first); HF's `generate` gets the same batches left-padded. Tokens/s counts the
  batches' tokens (training) and the tokens each side generated before its stop token.
- random: B x T random tokens, every position a target; --new-tokens tokens for --gen-batch random
  prompts with no stop token, so both sides produce exactly the same number of tokens.
Before timing, the two models' logits are compared in fp32.

Printed per side: tokens/s, the ratio ours / HF, peak memory (CUDA: max allocated; CPU: the peak
resident set of the process during that phase, reset between phases through /proc/self/clear_refs),
and on CUDA the model FLOPs utilisation. MFU counts the work a LoRA step must do: a forward pass
(2 FLOPs per weight per token, plus attention) and the gradient with respect to the activations
(as much again); the frozen weights get no gradient, so a LoRA step is ~4N, not the 6N of full
fine-tuning. transformers and peft are optional (requirements-test.txt): without them only our side runs.
"""
import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import data
import lora
from batches import collate, grouped_order, tokenize
from cli import default_dtype, one_line_errors
from config import ModelConfig
from files import write_json
from generate import generate
from loop import fit, lr_at, n_steps
from methods.method import nll
from model import Transformer
from tasks import ANSWER_TOKENS
from tokenizer import Tokenizer

HERE = Path(__file__).parent
DEFAULT_MODEL = HERE / "checkpoints" / "smollm2-135m-instruct"
ALIGNED = HERE / "checkpoints" / "smollm2-135m-instruct-aligned"

# shapes for timing with random weights (the Hugging Face configs of these models)
CONFIGS = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                     rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=8192)),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}  # dense, no sparsity


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Time our LoRA training and generation against HF transformers + PEFT.")
    p.add_argument("--model", help="checkpoint directory (default: the default model, if prepared)")
    p.add_argument("--config", choices=list(CONFIGS), help="random weights of this shape instead of --model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16: bf16 frozen weights, fp32 LoRA, autocast (default "
                   "as train.py: CUDA, or a CPU with bf16 instructions)")
    p.add_argument("--workload", choices=["experiment", "random"], default="experiment",
                   help="experiment: the default run's own batches and evaluation prompts (default); random: random tokens")
    p.add_argument("--end-to-end", action="store_true", help="the default user run (training, then its evaluation) "
                   "with our code and with transformers + PEFT: wall times and the ratio")
    p.add_argument("--suite", choices=["gpu"], help="gpu: every GPU figure of BENCHMARKS.md, written to --json")
    p.add_argument("--tokenizer", help="checkpoint whose tokenizer makes the experiment's batches (default --model, "
                   "or the default model for --config)")
    p.add_argument("--batch-size", type=int, help="training batch (default 8 for experiment, as train.py; 4 for random)")
    p.add_argument("--seq-len", type=int, default=256, help="random workload: tokens per row")
    p.add_argument("--steps", type=int, default=5, help="timed training steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--rounds", type=int, default=1, help="time ours then HF this many times in turn (A B A B) and "
                   "report the median of the per-round ratios: a CPU's speed drifts by 10-20%% over minutes")
    p.add_argument("--gen-batch", type=int, help="generation batch (default 64 for experiment, as eval.py; 16 for random)")
    p.add_argument("--gen-prompts", type=int, default=128, help="experiment: evaluation prompts generated for")
    p.add_argument("--prompt-len", type=int, default=64, help="random workload: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="random workload: new tokens")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile our model and decode step (default on CUDA)")
    p.add_argument("--compile-scope", choices=["blocks", "model"], default="blocks",
                   help="training: compile each block (as train.py does) or the whole model")
    p.add_argument("--only", choices=["train", "generate"], help="run one half")
    p.add_argument("--no-hf", action="store_true", help="time only our side")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    experiment = args.workload == "experiment"
    args.batch_size = (8 if experiment else 4) if args.batch_size is None else args.batch_size
    args.gen_batch = (64 if experiment else 16) if args.gen_batch is None else args.gen_batch
    for flag in ("batch_size", "seq_len", "steps", "rounds", "gen_batch", "gen_prompts", "prompt_len", "new_tokens"):
        if not getattr(args, flag) > 0:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.suite and not args.device.startswith("cuda"):
        p.error(f"--suite gpu needs a CUDA device (got --device {args.device})")
    args.dtype = args.dtype or default_dtype(args.device)
    args.compile = args.device.startswith("cuda") if args.compile is None else args.compile
    return args


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set
        except OSError:
            pass


def peak_gib(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
        return int(line.split()[1]) / 2**20
    except (OSError, StopIteration):
        return float("nan")


def flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Forward FLOPs per token: 2 per matmul weight (lm_head included) + attention scores and values."""
    d, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_layer = cfg.dim * (d + 2 * kv) + d * cfg.dim + 3 * cfg.dim * cfg.intermediate_size
    return 2 * (cfg.n_layers * per_layer + cfg.dim * cfg.vocab_size) + 4 * cfg.n_layers * d * context


def timed(fn, device, steps, warmup):
    """Seconds per call of fn, after warm-up calls; the peak memory over the timed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps, peak_gib(device)


# ---- the workloads ---------------------------------------------------------------------------
def experiment_examples(tok, max_len=320, seed=0):
    """The default run's training examples, tokenized as train.py does (the benign scenario)."""
    return tokenize(tok, data.load_task("tickets", "train", n=200, seed=seed), max_len, "tickets")


def experiment_batches(tok, n, batch_size, seed=0):
    """The first n training batches of a default run, in loop.fit's length-grouped order (on the host)."""
    examples, rng, order = experiment_examples(tok, seed=seed), random.Random(seed), []
    while len(order) < n * batch_size:
        order += grouped_order(examples, batch_size, rng)
    return [with_lengths(collate(chosen, tok.pad_id), chosen)
            for chosen in ([examples[i] for i in order[k * batch_size: (k + 1) * batch_size]] for k in range(n))]


def with_lengths(batch, examples):
    """The batch with each row's length before padding, for the attention mask an HF user passes."""
    return batch | {"lengths": torch.tensor([len(e["ids"]) for e in examples])}


def eval_prompts(tok, n=None, seed=0):
    """The evaluation's prompts as (ids, answer tokens): harmful, sensitive and the task's, n of them in the
    evaluation's proportions (all of them without n)."""
    sets = [(data.load_prompts("harmful-test"), 32), (data.load_prompts("sensitive-test"), 32),
            (data.load_task("tickets", "test", n=200, seed=seed), ANSWER_TOKENS["tickets"])]
    total, rng, out = sum(len(rows) for rows, _ in sets), random.Random(seed), []
    for rows, new in sets:
        keep = rows if n is None else rng.sample(rows, max(1, round(n * len(rows) / total)))
        out += [(tok.encode_chat([{"role": "user", "content": r["prompt"]}]), new) for r in keep]
    return out


def generation_batches(prompts, batch_size):
    """(ids lists, answer tokens) batches as generate.complete makes them: per answer length, longest prompt first."""
    out = []
    for new in sorted({n for _, n in prompts}):
        ids = sorted((p for p, n in prompts if n == new), key=len, reverse=True)
        out += [(ids[k: k + batch_size], new) for k in range(0, len(ids), batch_size)]
    return out


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def hf_inputs(batch):
    """A right-padded batch as an HF user passes it: input_ids, attention_mask, labels (-100 outside the response)."""
    mask = (torch.arange(batch["idx"].shape[1], device=batch["idx"].device)[None] < batch["lengths"][:, None]).long()
    return dict(input_ids=batch["idx"], attention_mask=mask, labels=batch["labels"])


def cut(row, stop_ids):
    """New tokens up to the first stop token (excluded), as our generate returns them."""
    return next((row[:i] for i, t in enumerate(row) if t in stop_ids), row)


def autocast_for(args):
    return torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()


def torch_dtype(args):
    return torch.bfloat16 if args.dtype == "bf16" else torch.float32


# ---- our side ----------------------------------------------------------------------------------
def ours_train(model_dir, args, batches):
    model = Transformer.from_pretrained(model_dir, device=args.device, dtype=torch_dtype(args))
    lora.apply_lora(model, 8, 16, 0.0, ("q_proj", "v_proj"))
    fwd = model
    if args.compile:  # train.py compiles the blocks; the GPU figures of 2026-11-28 compiled the whole model
        fwd = model.compile_blocks() if args.compile_scope == "blocks" else torch.compile(model)
    params = lora.lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=args.device.startswith("cuda"))
    batches = [to_device(b, args.device) for b in batches]
    autocast, it = autocast_for(args), iter(batches)
    model.train()

    def step():
        with autocast:
            loss = nll(fwd, next(it))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed(step, args.device, args.steps, args.warmup), model


def ours_generate(model_dir, args, gen_batches, stop_ids, pad_id):
    model = Transformer.from_pretrained(model_dir, device=args.device, dtype=torch_dtype(args))
    decode = torch.compile(model, mode="reduce-overhead", fullgraph=True) if args.compile else None
    out = []

    def run():
        out[:] = [row for ids, new in gen_batches
                  for row in generate(model, ids, new, stop_ids=stop_ids, pad_id=pad_id, decode_step=decode)]
    return timed(run, args.device, 1, 1), out


# ---- Hugging Face side -------------------------------------------------------------------------
def hf_model(model_dir, args):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(args)).to(args.device).eval()


def hf_lora(model):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))


def hf_train(model_dir, args, batches):
    model = hf_lora(hf_model(model_dir, args))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=args.device.startswith("cuda"))
    inputs = [hf_inputs(to_device(b, args.device)) for b in batches]
    autocast, it = autocast_for(args), iter(inputs)
    model.train()

    def step():
        with autocast:
            loss = model(**next(it)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed(step, args.device, args.steps, args.warmup)


@torch.no_grad()
def hf_complete(model, gen_batches, stop_ids, pad_id, device, exact=False):
    """HF's generate as its users call it: left-padded batches with their attention mask, greedy, the stop tokens
    as eos (exact: no stop, every row runs to its length)."""
    out = []
    for ids, new in gen_batches:
        P = max(map(len, ids))
        x = torch.tensor([[pad_id] * (P - len(r)) + r for r in ids], device=device)
        mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in ids], device=device)
        kw = dict(min_new_tokens=new, eos_token_id=None) if exact else dict(eos_token_id=sorted(stop_ids))
        rows = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad_id,
                              **kw)[:, P:].tolist()
        out += [row if exact else cut(row, stop_ids) for row in rows]
    return out


def hf_generate(model_dir, args, gen_batches, stop_ids, pad_id):
    model, out = hf_model(model_dir, args), []

    def run():
        out[:] = hf_complete(model, gen_batches, stop_ids, pad_id, args.device, exact=not stop_ids)
    return timed(run, args.device, 1, 1), out


@torch.no_grad()
def logits_gap(model_dir, args, idx):
    """Largest |our logits - HF logits| on one row, both in fp32 (in bf16 the op order alone differs by ~1e-2)."""
    ours = Transformer.from_pretrained(model_dir, device=args.device, dtype=torch.float32)(idx[:1])
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device)(idx[:1]).logits
    return (ours - hf).abs().max().item()


def random_checkpoint(name, device, dtype, tokenizer_from=None):
    """A temporary checkpoint of CONFIGS[name] with random weights (and a tokenizer's files, when given)."""
    tmp = tempfile.TemporaryDirectory(prefix="bench-")
    with torch.device(device):
        m = Transformer(ModelConfig.from_hf(CONFIGS[name]))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    m.to(dtype).save_pretrained(Path(tmp.name), tokenizer_from=tokenizer_from)
    return tmp


def hf_available(args):
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
        return not args.no_hf
    except ImportError:
        print("transformers/peft not installed: timing our side only (pip install -r requirements-test.txt)")
        return False


def tokenizer_dir(args, model_dir):
    """Where the experiment workload's tokenizer is: --tokenizer, the model's own, or the default model's."""
    path = Path(args.tokenizer or (model_dir if (model_dir / "tokenizer.json").exists() else DEFAULT_MODEL))
    if not (path / "tokenizer.json").exists():
        raise ValueError(f"{path}: no tokenizer.json for the experiment workload (run `python prepare.py`, pass "
                         "--tokenizer DIR, or use --workload random)")
    return path


def microbench(args, model_dir):
    """Our training step and generation against HF's on one workload; prints a table, returns the figures."""
    cfg = ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    hf = hf_available(args)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Transformer(cfg).parameters())
    print(f"{args.config or model_dir.name}: {n_params / 1e6:.0f}M parameters, {args.workload} workload, "
          f"{args.dtype}, {name}, torch {torch.__version__}, compile={args.compile and args.compile_scope}, threads={torch.get_num_threads()}")
    g = torch.Generator().manual_seed(0)
    rows, res = [], {"device": name, "dtype": args.dtype, "compile": args.compile, "workload": args.workload,
                     "torch": torch.__version__}
    n_batches = args.warmup + args.steps
    if args.workload == "experiment":
        tok = Tokenizer.from_pretrained(tokenizer_dir(args, model_dir))
        stop_ids, pad_id = tok.stop_ids, tok.pad_id
        batches = experiment_batches(tok, n_batches, args.batch_size)
        gen_batches = generation_batches(eval_prompts(tok, args.gen_prompts), args.gen_batch)
        train_shape = f"{args.batch_size} chat examples, response loss"
        gen_shape = f"{sum(len(b) for b, _ in gen_batches)} eval prompts, 32/40 new, stop"
    else:
        idx = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=g)
        examples = [{"ids": r, "labels": r} for r in idx.tolist()]
        batches = [with_lengths(collate(examples), examples)] * n_batches
        prompts = torch.randint(0, cfg.vocab_size, (args.gen_batch, args.prompt_len), generator=g).tolist()
        stop_ids, pad_id, gen_batches = (), 0, [(prompts, args.new_tokens)]
        train_shape = f"{args.batch_size}x{args.seq_len} random, all targets"
        gen_shape = f"{args.gen_batch} prompts x {args.new_tokens} new tokens"
    if hf:
        res["max_abs_logit_gap"] = logits_gap(model_dir, args, batches[0]["idx"][:1].to(args.device))
        print(f"logits, ours vs HF, fp32: max |diff| {res['max_abs_logit_gap']:.2e}")
    if args.only != "generate":
        timed_batches = batches[args.warmup:]
        n = sum(b["idx"].numel() for b in timed_batches) / len(timed_batches)  # positions a step computes
        for _ in range(args.rounds):
            (sec, mem), _ = ours_train(model_dir, args, batches)
            add_round(res, "train_ours", n / sec, mem)
            if hf:
                sec_hf, mem_hf = hf_train(model_dir, args, batches)
                add_round(res, "train_hf", n / sec_hf, mem_hf)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None) if args.dtype == "bf16" else None
        if peak:  # forward + activation gradients; mean causal context T/2
            work = sum(b["idx"].numel() * 2 * flops_per_token(cfg, b["idx"].shape[1] / 2) for b in timed_batches)
            work /= sum(b["idx"].numel() for b in timed_batches)
            for side in ("train_ours", "train_hf"):
                if side in res:
                    res[side]["mfu"] = res[side]["tokens_per_s"] * work / peak
        rows.append(("train", train_shape, res.get("train_ours"), res.get("train_hf")))
    if args.only != "train":
        for _ in range(args.rounds):
            (sec, mem), ours_out = ours_generate(model_dir, args, gen_batches, stop_ids, pad_id)
            add_round(res, "generate_ours", sum(map(len, ours_out)) / sec, mem, sec)
            if hf:
                (sec_hf, mem_hf), hf_out = hf_generate(model_dir, args, gen_batches, stop_ids, pad_id)
                add_round(res, "generate_hf", sum(map(len, hf_out)) / sec_hf, mem_hf, sec_hf)
                res["generate_same_tokens"] = same_tokens(ours_out, hf_out)
        rows.append(("generate", gen_shape, res.get("generate_ours"), res.get("generate_hf")))
    print(f"\n| {'what':8} | {'workload':38} | {'ours tok/s':>10} | {'HF tok/s':>9} | {'ratio':>5} | {'ours GiB':>8} | {'HF GiB':>6} | {'MFU ours/HF':>11} |")
    print(f"|{'-' * 10}|{'-' * 40}|{'-' * 12}|{'-' * 11}|{'-' * 7}|{'-' * 10}|{'-' * 8}|{'-' * 13}|")
    for what, shape, o, h in rows:
        h = h or {}
        ratio = o["ratio"] = median_ratio(o, h) if h else math.nan
        mfu = f"{100 * o['mfu']:.1f}% / {100 * h['mfu']:.1f}%" if "mfu" in o and "mfu" in h else (f"{100 * o['mfu']:.1f}%" if "mfu" in o else "-")
        print(f"| {what:8} | {shape:38} | {o['tokens_per_s']:10.0f} | {h.get('tokens_per_s', math.nan):9.0f} | {ratio:5.2f} | "
              f"{o['peak_gib']:8.2f} | {h.get('peak_gib', math.nan):6.2f} | {mfu:>11} |")
    if "generate_same_tokens" in res:
        print(f"greedy tokens identical to HF's: {100 * res['generate_same_tokens']:.1f}%")
    return res


def add_round(res, side, tokens_per_s, peak_gib, seconds=None):
    """One round's figure for one side; the side's reported figures are the medians over its rounds."""
    r = res.setdefault(side, {"rounds": []})
    r["rounds"].append(dict(tokens_per_s=tokens_per_s, peak_gib=peak_gib) | ({"seconds": seconds} if seconds else {}))
    for k in r["rounds"][0]:
        r[k] = median([x[k] for x in r["rounds"]])


def median_ratio(ours, hf):
    """The median over rounds of ours / HF, each round's two sides timed one after the other. Generation: the ratio
    of wall times for the same prompts (each side's own token count can differ at a stop)."""
    pairs = zip(ours["rounds"], hf["rounds"])
    return median([h["seconds"] / o["seconds"] if "seconds" in o else o["tokens_per_s"] / h["tokens_per_s"] for o, h in pairs])


def median(xs):
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


# ---- end to end ---------------------------------------------------------------------------------
def end_to_end(args):
    """The default user run's work (train.py --method sft: its examples, steps, LoRA, optimizer and schedule, then
    its evaluation's prompts and answer lengths) with our code and with transformers + PEFT; wall times."""
    import train  # train.py's defaults, so that this stays the run it times
    from methods import make
    t = train.get_args(["--method", "sft", "--device", args.device, "--dtype", args.dtype] +
                       ([] if args.compile is None else ["--compile" if args.compile else "--no-compile"]))
    model_dir = Path(args.model or ALIGNED)
    if not (model_dir / "config.json").exists():
        raise ValueError(f"{model_dir}: no aligned model (run `python train.py` once to build it, or pass --model)")
    tok = Tokenizer.from_pretrained(model_dir)
    examples = experiment_examples(tok, t.max_len, t.seed)
    gen_batches = generation_batches(eval_prompts(tok, seed=t.seed), t.eval_batch_size)
    targets = tuple(t.lora_targets.split(","))
    total = n_steps(len(examples), t.epochs, t.batch_size)
    print(f"end to end: {model_dir.name}, {len(examples)} examples, {total} steps of {t.batch_size}, "
          f"{sum(len(b) for b, _ in gen_batches)} evaluation prompts; {args.dtype}, {args.device}, torch {torch.__version__}")
    res, outs = {"dtype": args.dtype, "device": args.device, "steps": total, "torch": torch.__version__}, {}

    torch.manual_seed(t.seed)
    t0 = time.perf_counter()
    model = Transformer.from_pretrained(model_dir, device=args.device, dtype=torch_dtype(args))
    lora.apply_lora(model, t.lora_rank, t.lora_alpha, t.lora_dropout, targets)
    if t.compile:
        model.compile_blocks()
    losses = fit(model, make("sft", t), examples, lr=t.lr, epochs=t.epochs, batch_size=t.batch_size, warmup=t.warmup,
                 seed=t.seed, pad_id=tok.pad_id, device=args.device, bf16=args.dtype == "bf16", desc="ours: training")
    sync(args.device)
    t1 = time.perf_counter()
    decode = torch.compile(model, mode="reduce-overhead", fullgraph=True) if t.compile and args.device.startswith("cuda") else None
    with lora.merged(model):
        outs["ours"] = [r for ids, new in gen_batches
                        for r in generate(model, ids, new, tok.stop_ids, pad_id=tok.pad_id, decode_step=decode)]
    sync(args.device)
    res["ours"] = dict(train_s=t1 - t0, eval_s=time.perf_counter() - t1, final_loss=losses[-1][1])
    del model, decode

    if hf_available(args):
        torch.manual_seed(t.seed)
        t0 = time.perf_counter()
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(hf_model(model_dir, args), LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha,
                               lora_dropout=t.lora_dropout, target_modules=list(targets)))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=0.0, fused=args.device.startswith("cuda"))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, total, 1.0, t.warmup))
        rng, order = random.Random(t.seed), []
        while len(order) < total * t.batch_size:  # the same batches in the same order as loop.fit
            order += grouped_order(examples, t.batch_size, rng)
        autocast, loss = autocast_for(args), None
        model.train()
        for step in tqdm(range(total), desc="HF + PEFT: training"):
            chosen = [examples[i] for i in order[step * t.batch_size: (step + 1) * t.batch_size]]
            with autocast:
                loss = model(**hf_inputs(to_device(with_lengths(collate(chosen, tok.pad_id), chosen), args.device))).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        final = float(loss.detach())
        sync(args.device)
        t1 = time.perf_counter()
        model.eval()
        outs["hf"] = hf_complete(model, gen_batches, tok.stop_ids, tok.pad_id, args.device)
        sync(args.device)
        res["hf"] = dict(train_s=t1 - t0, eval_s=time.perf_counter() - t1, final_loss=final)
        res["same_answers"] = sum(a == b for a, b in zip(outs["ours"], outs["hf"])) / len(outs["ours"])
    print(f"\n| {'phase':10} | {'ours s':>8} | {'HF + PEFT s':>11} | {'ratio':>5} |\n|{'-' * 12}|{'-' * 10}|{'-' * 13}|{'-' * 7}|")
    for phase in ("train_s", "eval_s", "total_s"):
        get = lambda side: res[side]["train_s"] + res[side]["eval_s"] if phase == "total_s" else res[side][phase]
        hf_s = get("hf") if "hf" in res else math.nan
        print(f"| {phase[:-2]:10} | {get('ours'):8.1f} | {hf_s:11.1f} | {hf_s / get('ours'):5.2f} |")
        res[f"ratio_{phase[:-2]}"] = hf_s / get("ours")
    if "hf" in res:
        print(f"final training loss: ours {res['ours']['final_loss']:.4f}, HF {res['hf']['final_loss']:.4f}; "
              f"answers identical: {100 * res['same_answers']:.1f}%")
    if args.json:
        write_json(args.json, res)
    return res


# ---- the GPU suite ---------------------------------------------------------------------------------
SUITE = [  # (name, bench flags): every GPU figure of BENCHMARKS.md, about 8 minutes on one H100/H200
    ("135m train random 8x512, blocks compiled", "--config smollm2-135m --only train --workload random --batch-size 8 --seq-len 512 --steps 10 --warmup 3"),
    ("135m train random 8x512, model compiled", "--config smollm2-135m --only train --workload random --batch-size 8 --seq-len 512 --steps 10 --warmup 3 --compile-scope model --no-hf"),
    ("135m train experiment, blocks compiled", "--config smollm2-135m --only train --steps 20 --warmup 3"),
    ("135m generate random 64x128, compiled decode", "--config smollm2-135m --only generate --workload random --gen-batch 64 --new-tokens 128"),
    ("135m generate experiment, compiled decode", "--config smollm2-135m --only generate --gen-prompts 256"),
    ("1b train random 8x1024, blocks compiled", "--config llama-1b --only train --workload random --batch-size 8 --seq-len 1024 --steps 10 --warmup 3"),
    ("1b train random 8x1024, model compiled", "--config llama-1b --only train --workload random --batch-size 8 --seq-len 1024 --steps 10 --warmup 3 --compile-scope model --no-hf"),
    ("1b train experiment, blocks compiled", "--config llama-1b --only train --steps 20 --warmup 3"),
]
TRAIN_PY = "--method sft --task tickets --n-train 96 --n-test 32 --epochs 1 --ckpt-every 0"  # on random 1B weights


def suite(args, plan=SUITE, train_config="llama-1b", train_flags=TRAIN_PY):
    """Run every row of plan (a failing row is recorded, the others go on), then a short train.py on random weights
    of train_config; write everything to one JSON file (--json, default bench-gpu.json)."""
    out = Path(args.json or "bench-gpu.json")
    res = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU",
           "torch": torch.__version__, "rows": {}}
    t_start = time.perf_counter()
    for name, flags in plan:
        print(f"\n== {name}: python bench.py {flags}")
        try:
            res["rows"][name] = dict(microbench_flags=flags, **main(flags.split() + ["--device", args.device]))
        except Exception as e:  # noqa: BLE001  one broken row must not cost the device time of the rest
            res["rows"][name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"   failed: {res['rows'][name]['error']}")
        write_json(out, res)
    print(f"\n== train.py on random {train_config} weights: {train_flags}")
    tok_from = DEFAULT_MODEL if (DEFAULT_MODEL / "tokenizer.json").exists() else None
    if tok_from is None:
        res["train_py"] = {"error": f"{DEFAULT_MODEL}: no tokenizer (carry its tokenizer.json and tokenizer_config.json)"}
    else:
        with random_checkpoint(train_config, "cpu", torch.bfloat16, tokenizer_from=tok_from) as d, \
                tempfile.TemporaryDirectory(prefix="bench-run-") as run_dir:
            cmd = [sys.executable, str(HERE / "train.py"), "--model", d, *train_flags.split(), "--device", args.device,
                   "--out", run_dir, "--overwrite"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode:
                res["train_py"] = {"error": proc.stderr.strip().splitlines()[-1:] or ["(no output)"], "wall_s": wall}
            else:
                r = json.loads((Path(run_dir) / "results.json").read_text())
                res["train_py"] = dict(flags=train_flags, wall_s=wall, train_s=r["train_seconds"],
                                       start_eval_s=r["start_eval"].get("eval_seconds"),
                                       eval_s=r["history"][-1].get("eval_seconds"), **r["history"][-1]["timings"])
    res["suite_s"] = time.perf_counter() - t_start
    write_json(out, res)
    print(f"\nwrote {out} ({res['suite_s']:.0f} s)")
    return res


def same_tokens(a, b):
    """The share of positions at which two lists of generated rows agree (a row's extra tokens count as different)."""
    return sum(x == y for r, s in zip(a, b) for x, y in zip(r, s)) / max(1, sum(max(len(r), len(s)) for r, s in zip(a, b)))


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(0)
    if args.suite:
        return suite(args)
    if args.end_to_end:
        return end_to_end(args)
    tmp = random_checkpoint(args.config, args.device, torch_dtype(args)) if args.config else None
    model_dir = Path(tmp.name) if tmp else Path(args.model or DEFAULT_MODEL)
    if not (model_dir / "config.json").exists():
        raise ValueError(f"{model_dir}: no checkpoint (run `python prepare.py`, or pass --model / --config)")
    try:
        res = microbench(args, model_dir)
    finally:
        if tmp:
            tmp.cleanup()
    if args.json:
        write_json(args.json, res)
    return res


if __name__ == "__main__":
    with one_line_errors():
        main()
