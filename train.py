"""Fine-tune a safety-aligned chat model on a user's task with a continual-learning method, and
measure what it forgot ("Unforgotten Safety", Alssum et al. 2025).

    python train.py --method replay                       # the default experiment, benign user data
    python train.py --method der --scenario poisoned      # 10% of the user's examples are harmful
    python train.py --model DIR --task gsm8k.jsonl ...    # your own aligned checkpoint and data

Without --model the default experiment runs: the provider's aligned SmolLM2-135M-Instruct is built
once and cached (align.py), then a fresh LoRA is trained on the user's task(s) with --method, and the
starting and the fine-tuned model are evaluated on held-out harmful prompts (ASR), benign-but-
sensitive prompts (over-refusal) and the task (accuracy). OUT/results.json keeps every number and
the full config; OUT/adapter is the user's LoRA in PEFT layout.

Shape of the loop (nanoGPT): config, setup, data, lr schedule, loop. A method (methods/) supplies the
loss and optional hooks; this file owns backward, accumulation, autocast, the optimizer and the schedule.
"""
import argparse
import hashlib
import json
import math
import random
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import data
import lora
from eval import evaluate, print_table
from methods import METHODS
from methods.base import collate, to_device
from model import Transformer, write_json
from tokenizer import Tokenizer


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Fine-tune an aligned model with a CL method; evaluate safety and utility.")
    p.add_argument("--method", default="sft", help=f"one of {', '.join(METHODS)} (default sft)")
    p.add_argument("--scenario", default="benign", choices=["benign", "poisoned"])
    p.add_argument("--poison-ratio", type=float, default=0.1, help="poisoned: harmful examples per user example")
    p.add_argument("--poison-data", default="generated",
                   help="harmful prompt+compliant answer pairs: 'generated' (default model only) or a file")
    p.add_argument("--model", help="your aligned checkpoint directory (skips the default alignment)")
    p.add_argument("--task", default="arithmetic", help="user task(s), comma-separated, learned in sequence")
    p.add_argument("--n-train", type=int, default=200, help="training examples per task")
    p.add_argument("--n-test", type=int, default=50, help="test examples per task")
    p.add_argument("--safety-data", default="default", help="the safety memory M: 'default' or a file")
    p.add_argument("--harmful", default="harmful-test", help="harmful prompts for ASR, comma-separated names or files")
    p.add_argument("--sensitive", default="sensitive-test", help="benign-but-sensitive prompts for over-refusal")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3; 3e-4 left the task unlearned)")
    p.add_argument("--warmup", type=float, default=0.05, help="share of steps with linear warm-up")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-len", type=int, default=320, help="tokens per training example")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    p.add_argument("--max-new-tokens", type=int, default=48, help="answer length for the safety evaluation")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--chat-format", help="override the chat format read from the checkpoint")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16 = autocast (default on CUDA); fp32 default on CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output directory (default out/METHOD-SCENARIO-sSEED)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    pre = argparse.ArgumentParser(add_help=False)  # learn --method first: its flags join the parser (and --help)
    pre.add_argument("--method", default="sft")
    known, _ = pre.parse_known_args(argv)
    if known.method not in METHODS:
        p.error(f"--method {known.method!r}: unknown method (choose from {', '.join(METHODS)})")
    METHODS[known.method].add_args(p)
    args = p.parse_args(argv)
    for flag in ("n_train", "n_test", "batch_size", "grad_accum", "max_len", "lora_rank"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if not 0 <= args.poison_ratio <= 1:
        p.error(f"--poison-ratio must be in [0, 1], got {args.poison_ratio}")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.compile = args.device.startswith("cuda") if args.compile is None else args.compile
    args.out = args.out or f"out/{args.method}-{args.scenario}-s{args.seed}"
    return args


def tokenize(tok, examples, max_len, where):
    """{prompt, response} examples -> {ids, labels}; the loss counts the response tokens only."""
    out = []
    for i, e in enumerate(examples):
        ids, labels = tok.encode_example([{"role": "user", "content": e["prompt"]}, {"role": "assistant", "content": e["response"]}])
        if sum(l == -100 for l in labels) >= max_len:
            raise ValueError(f"{where}: example {i + 1}: the prompt alone is longer than --max-len {max_len}")
        out.append({"ids": ids[:max_len], "labels": labels[:max_len]})
    return out


def lr_at(step, total, args):
    """Linear warm-up, then cosine decay to 10% of --lr."""
    warm = max(1, int(args.warmup * total))
    if step < warm:
        return args.lr * (step + 1) / warm
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm))))


def grouped_order(examples, per_step, rng, window=16):
    """One epoch's order: shuffled, then sorted by length inside windows of `window` steps, steps shuffled.

    Examples of a step have similar lengths, so little of the batch is padding (HF's group_by_length).
    """
    order = rng.sample(range(len(examples)), len(examples))
    steps = []
    for i in range(0, len(order), per_step * window):
        chunk = sorted(order[i: i + per_step * window], key=lambda j: len(examples[j]["ids"]))
        steps += [chunk[k: k + per_step] for k in range(0, len(chunk), per_step)]
    rng.shuffle(steps)
    return [j for step in steps for j in step]


def train(model, fwd, method, examples, args, pad_id, desc="training"):
    """Optimise the trainable parameters on `examples` with `method`; returns per-step losses."""
    device = args.device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, foreach=True)
    rng = random.Random(args.seed)
    per_step = args.batch_size * args.grad_accum
    total = max(1, math.ceil(args.epochs * len(examples) / per_step))
    order = []
    while len(order) < total * per_step:  # whole shuffled epochs, cut at the last step
        order += grouped_order(examples, per_step, rng)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    model.train()
    losses = []
    for step in (bar := tqdm(range(total), desc=desc)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args)
        chosen = [examples[i] for i in order[step * per_step: (step + 1) * per_step]]
        norm = max(1, sum(sum(l != -100 for l in e["labels"][1:]) for e in chosen))  # target tokens in the step
        step_loss = 0.0
        for m in range(args.grad_accum):
            micro = chosen[m * args.batch_size: (m + 1) * args.batch_size]
            batch = to_device(collate(micro, pad_id, norm=norm, frac=1 / args.grad_accum), device)
            with autocast:
                loss = method.loss(fwd, batch)
            loss.backward()
            step_loss += loss.detach()
        method.after_backward(model)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == total - 1:  # reading the loss syncs with the device: not every step
            value = float(step_loss)
            if not math.isfinite(value):
                raise ValueError(f"non-finite loss ({value}) at step {step}: lower --lr or check the data")
            losses.append((step, value))
            bar.set_postfix(loss=f"{value:.3f}")
    model.eval()
    return losses


def file_hashes(specs):
    """sha256 of each data file behind the given specs (built-in names resolve to data/)."""
    out = {}
    for spec in specs:
        paths = [Path(spec)] if Path(spec).exists() else sorted(Path(__file__).parent.joinpath("data").glob("*"))
        for p in paths:
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return out


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        return None


def evaluate_start(model, tok, model_dir, harmful, sensitive, test_sets, args, eval_kw):
    """The starting model's metrics, cached: every run from the same checkpoint and eval settings shares them."""
    key = json.dumps([str(Path(model_dir).resolve()), (Path(model_dir) / "config.json").stat().st_mtime, tok.chat_format,
                      harmful, sensitive, {t: e for t, (e, _) in test_sets.items()}, eval_kw], sort_keys=True)
    cache = Path(__file__).parent / "checkpoints" / "eval-cache" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cache.exists():
        print(f"starting model {model_dir}: metrics from {cache}")
        return json.loads(cache.read_text())
    print(f"evaluating the starting model {model_dir}")
    start = evaluate(model, tok, harmful, sensitive, test_sets, **eval_kw)
    write_json(cache, start)
    return start


def run(args):
    out = Path(args.out)
    if (out / "results.json").exists() and not args.overwrite:
        raise ValueError(f"--out {out}: holds a finished run (results.json); pass --overwrite to replace it")
    t_start = time.time()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if args.model:
        model_dir, poison_source = Path(args.model), args.poison_data
    else:
        import align
        model_dir = align.ensure_aligned(args.device)
        poison_source = align.poison_file() if args.poison_data == "generated" else args.poison_data
    tok = Tokenizer.from_pretrained(model_dir, chat_format=args.chat_format)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = Transformer.from_pretrained(model_dir, device=args.device, dtype=dtype)

    # data: the user's task(s), the poison, the safety memory, the evaluation sets
    tasks = args.task.split(",")
    train_sets = [data.load_task(t, "train", args.n_train, args.seed) for t in tasks]
    test_sets = {t: (data.load_task(t, "test", args.n_test, args.seed), data.task_metric(t)) for t in tasks}
    if args.scenario == "poisoned":
        if poison_source == "generated":
            raise ValueError("--poison-data generated needs the default model; give a file of harmful prompt/answer pairs")
        poison = data.load_task(poison_source, "all")  # harmful prompts with compliant answers
        n = round(args.poison_ratio * args.n_train)
        rng = random.Random(args.seed)
        train_sets = [s + rng.sample(poison, min(n, len(poison))) for s in train_sets]
    safety = data.safety_data(args.safety_data)
    if not args.model and args.safety_data == "default":  # the memory never holds the poison's prompts
        held_apart = set(range(len(safety))[align.POISON])
        safety = [s for i, s in enumerate(safety) if i not in held_apart]
    memory = tokenize(tok, safety, args.max_len, f"--safety-data {args.safety_data}")
    harmful = [h for spec in args.harmful.split(",") for h in data.load_prompts(spec)]
    sensitive = data.load_prompts(args.sensitive) if args.sensitive else []
    eval_kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size)

    start = evaluate_start(model, tok, model_dir, harmful, sensitive, test_sets, args, eval_kw)

    lora.apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, tuple(args.lora_targets.split(",")))
    fwd = torch.compile(model) if args.compile else model  # compiled after LoRA injection; we save `model`
    method = METHODS[args.method](args)
    history, train_seconds = [], 0.0
    for i, (name, examples) in enumerate(zip(tasks, train_sets)):
        task = tokenize(tok, examples, args.max_len, f"--task {name}")
        method.begin_task(model, task, memory)
        t0 = time.time()
        losses = train(model, fwd, method, method.data(task, memory), args, tok.pad_id, desc=f"task {i + 1}/{len(tasks)} {name} [{args.method}]")
        train_seconds += time.time() - t0
        method.end_task(model)
        seen = {t: test_sets[t] for t in tasks[: i + 1]}
        history.append({"task": name, "losses": losses, **evaluate(model, tok, harmful, sensitive, seen, **eval_kw)})
    final = history[-1]
    lora.save_adapter(model, out / "adapter", base_model_name_or_path=str(model_dir))
    keys = ("asr", "over_refusal", "task_accuracy")
    results = {"method": args.method, "scenario": args.scenario, "poison_ratio": args.poison_ratio if args.scenario == "poisoned" else 0.0,
               "seed": args.seed, **{k: final.get(k) for k in keys}, "start": {k: start.get(k) for k in keys},
               "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t_start, 1),
               "model": str(model_dir), "judge": final["judge"], "history": history, "start_eval": start,
               "config": vars(args), "versions": {"torch": torch.__version__, "unforgotten": git_commit()},
               "data_hashes": file_hashes([*tasks, args.safety_data, *args.harmful.split(","), args.sensitive])}
    write_json(out / "results.json", results)
    print()
    print_table([("starting model", start)] + [(f"after {h['task']} ({args.method}, {args.scenario})", h) for h in history])
    print(f"train {train_seconds:.0f}s, total {results['total_seconds']:.0f}s; wrote {out / 'results.json'}")
    return results


def main(argv=None):
    args = get_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:  # expected user errors: one line, no traceback
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")


if __name__ == "__main__":
    main()
