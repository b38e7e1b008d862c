"""Throughput of our LoRA training step and our generation against Hugging Face transformers + PEFT.

    python bench.py                                   # the default checkpoint on this machine's device
    python bench.py --model DIR --dtype bf16          # any Hugging Face checkpoint
    python bench.py --config llama-1b --device cuda   # random weights of a known shape (timing only)

Both sides run in this one process on the same weights (a random config is saved to a temporary
checkpoint that both load) and on the same random token batches: training is a LoRA step (r 8 on
q_proj and v_proj, AdamW, grad clipping) on B x T tokens, every position a target; generation is
greedy decoding of --new-tokens tokens for --gen-batch prompts, with no stop token, so both sides
produce exactly the same number of tokens. Before timing, the two models' logits are compared.

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
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import lora
from batches import collate
from cli import one_line_errors
from generate import generate
from methods.method import nll
from model import ModelConfig, Transformer

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
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16: bf16 frozen weights, fp32 LoRA, autocast (default on CUDA)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed training steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile our model and decode step (default on CUDA)")
    p.add_argument("--compile-scope", choices=["blocks", "model"], default="blocks",
                   help="training: compile each block (as train.py does) or the whole model")
    p.add_argument("--only", choices=["train", "generate"], help="run one half")
    p.add_argument("--no-hf", action="store_true", help="time only our side")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
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


# ---- our side ----------------------------------------------------------------------------------
def ours_train(model_dir, args, idx):
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = Transformer.from_pretrained(model_dir, device=args.device, dtype=dtype)
    lora.apply_lora(model, 8, 16, 0.0, ("q_proj", "v_proj"))
    fwd = model
    if args.compile:  # train.py compiles the blocks; the GPU figures of 2026-11-28 compiled the whole model
        fwd = model.compile_blocks() if args.compile_scope == "blocks" else torch.compile(model)
    params = lora.lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=args.device.startswith("cuda"))
    batch = collate([{"ids": r, "labels": r} for r in idx.tolist()], device=args.device)
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    model.train()

    def step():
        with autocast:
            loss = nll(fwd, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed(step, args.device, args.steps, args.warmup), model


def ours_generate(model_dir, args, prompts):
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = Transformer.from_pretrained(model_dir, device=args.device, dtype=dtype)
    decode = torch.compile(model, mode="reduce-overhead", fullgraph=True) if args.compile else None
    out = []
    run = lambda: out.append(generate(model, prompts, args.new_tokens, stop_ids=(), decode_step=decode))
    return timed(run, args.device, 1, 1), out[-1]


# ---- Hugging Face side -------------------------------------------------------------------------
def hf_model(model_dir, args):
    from transformers import AutoModelForCausalLM
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()


def hf_train(model_dir, args, idx):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(hf_model(model_dir, args), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                 target_modules=["q_proj", "v_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=args.device.startswith("cuda"))
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    model.train()

    def step():
        with autocast:
            loss = model(input_ids=idx, labels=idx).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed(step, args.device, args.steps, args.warmup)


def hf_generate(model_dir, args, prompts):
    model = hf_model(model_dir, args)
    idx = torch.tensor(prompts, device=args.device)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    out = []
    run = lambda: out.append(model.generate(input_ids=idx, attention_mask=torch.ones_like(idx), **kw)[:, idx.shape[1]:].tolist())
    with torch.no_grad():
        return timed(run, args.device, 1, 1), out[-1]


@torch.no_grad()
def logits_gap(model_dir, args, idx):
    """Largest |our logits - HF logits| on one row, both in fp32 (in bf16 the op order alone differs by ~1e-2)."""
    ours = Transformer.from_pretrained(model_dir, device=args.device, dtype=torch.float32)(idx[:1])
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device)(idx[:1]).logits
    return (ours - hf).abs().max().item()


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(0)
    tmp = None
    if args.config:
        tmp = tempfile.TemporaryDirectory(prefix="bench-")
        model_dir = Path(tmp.name)
        with torch.device(args.device):
            m = Transformer(ModelConfig.from_hf(CONFIGS[args.config]))
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
        m.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32).save_pretrained(model_dir)
        del m
    else:
        model_dir = Path(args.model or Path(__file__).parent / "checkpoints" / "smollm2-135m-instruct")
        if not (model_dir / "config.json").exists():
            raise SystemExit(f"error: {model_dir}: no checkpoint (run `python prepare.py`, or pass --model / --config)")
    cfg = ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
        hf = not args.no_hf
    except ImportError:
        print("transformers/peft not installed: timing our side only (pip install -r requirements-test.txt)")
        hf = False
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Transformer(cfg).parameters())
    print(f"{args.config or model_dir.name}: {n_params / 1e6:.0f}M parameters, "
          f"{args.dtype}, {name}, torch {torch.__version__}, compile={args.compile and args.compile_scope}, threads={torch.get_num_threads()}")
    g = torch.Generator().manual_seed(0)
    rows, res = [], {"device": name, "dtype": args.dtype, "compile": args.compile, "torch": torch.__version__}
    idx = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=g).to(args.device)
    if hf:
        res["max_abs_logit_gap"] = logits_gap(model_dir, args, idx)
        print(f"logits, ours vs HF, fp32: max |diff| {res['max_abs_logit_gap']:.2e}")
    if args.only != "generate":
        n = args.batch_size * args.seq_len
        (sec, mem), _ = ours_train(model_dir, args, idx)
        res["train_ours"] = dict(tokens_per_s=n / sec, peak_gib=mem)
        if hf:
            sec_hf, mem_hf = hf_train(model_dir, args, idx)
            res["train_hf"] = dict(tokens_per_s=n / sec_hf, peak_gib=mem_hf)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None) if args.dtype == "bf16" else None
        if peak:
            work = 2 * flops_per_token(cfg, args.seq_len / 2)  # forward + activation gradients; mean causal context T/2
            for side in ("train_ours", "train_hf"):
                if side in res:
                    res[side]["mfu"] = res[side]["tokens_per_s"] * work / peak
        rows.append(("train", f"{args.batch_size}x{args.seq_len} LoRA step", res.get("train_ours"), res.get("train_hf")))
    if args.only != "train":
        prompts = torch.randint(0, cfg.vocab_size, (args.gen_batch, args.prompt_len), generator=g).tolist()
        n = args.gen_batch * args.new_tokens
        (sec, mem), ours_out = ours_generate(model_dir, args, prompts)
        res["generate_ours"] = dict(tokens_per_s=n / sec, peak_gib=mem)
        if hf:
            (sec_hf, mem_hf), hf_out = hf_generate(model_dir, args, prompts)
            res["generate_hf"] = dict(tokens_per_s=n / sec_hf, peak_gib=mem_hf)
            res["generate_same_tokens"] = sum(a == b for r, s in zip(ours_out, hf_out) for a, b in zip(r, s)) / n
        rows.append(("generate", f"{args.gen_batch} prompts x {args.new_tokens} new tokens, greedy",
                     res.get("generate_ours"), res.get("generate_hf")))
    print(f"\n| {'what':8} | {'shape':38} | {'ours tok/s':>10} | {'HF tok/s':>9} | {'ratio':>5} | {'ours GiB':>8} | {'HF GiB':>6} | {'MFU ours/HF':>11} |")
    print(f"|{'-' * 10}|{'-' * 40}|{'-' * 12}|{'-' * 11}|{'-' * 7}|{'-' * 10}|{'-' * 8}|{'-' * 13}|")
    for what, shape, o, h in rows:
        h = h or {}
        ratio = o["tokens_per_s"] / h["tokens_per_s"] if h else math.nan
        mfu = f"{100 * o['mfu']:.1f}% / {100 * h['mfu']:.1f}%" if "mfu" in o and "mfu" in h else (f"{100 * o['mfu']:.1f}%" if "mfu" in o else "-")
        print(f"| {what:8} | {shape:38} | {o['tokens_per_s']:10.0f} | {h.get('tokens_per_s', math.nan):9.0f} | {ratio:5.2f} | "
              f"{o['peak_gib']:8.2f} | {h.get('peak_gib', math.nan):6.2f} | {mfu:>11} |")
    if "generate_same_tokens" in res:
        print(f"greedy tokens identical to HF's: {100 * res['generate_same_tokens']:.1f}%")
    if args.json:
        from model import write_json
        write_json(args.json, res)
    if tmp:
        tmp.cleanup()
    return res


if __name__ == "__main__":
    with one_line_errors():
        main()
