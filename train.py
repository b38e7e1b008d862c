"""Fine-tune a safety-aligned chat model on a user's task with a continual-learning method, and
measure what it forgot ("Unforgotten Safety", Alssum et al. 2025).

    python train.py --method replay                       # the default experiment, benign user data
    python train.py --method der --scenario poisoned      # 10% of the user's examples are harmful
    python train.py --model DIR --task gsm8k.jsonl ...    # your own aligned checkpoint and data
    python train.py ... --resume                          # go on from OUT/ckpt after Ctrl-C, SIGTERM or a crash

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
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
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
from model import Transformer, read_json, write_json
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
    p.add_argument("--overwrite", action="store_true", help="replace a finished or stopped run in --out")
    p.add_argument("--ckpt-every", type=int, default=50, help="write OUT/ckpt every N optimizer steps (default 50; 0 = off)")
    p.add_argument("--resume", action="store_true", help="continue the stopped run in --out from OUT/ckpt")
    p.add_argument("--stop-after", type=int, help="stop after N optimizer steps of the run (all tasks), as on SIGTERM")
    pre = argparse.ArgumentParser(add_help=False)  # learn --method first: its flags join the parser (and --help)
    pre.add_argument("--method", default="sft")
    pre.add_argument("--base", default="sft")  # the method refresh wraps: its flags join too
    known, _ = pre.parse_known_args(argv)
    if known.method not in METHODS:
        p.error(f"--method {known.method!r}: unknown method (choose from {', '.join(METHODS)})")
    METHODS[known.method].add_args(p)
    if known.method == "refresh" and known.base in METHODS and known.base != "refresh":  # never one method's flags twice
        METHODS[known.base].add_args(p)
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


def n_steps(n_examples, args):
    """Optimizer steps of one task of n_examples."""
    return max(1, math.ceil(args.epochs * n_examples / (args.batch_size * args.grad_accum)))


def train(model, fwd, method, examples, args, pad_id, desc="training", ckpt=None, resume=None, stop_at=None):
    """Optimise the trainable parameters on `examples` with `method`; returns per-step losses.

    ckpt(step, opt, losses) -> path, given by run() unless --ckpt-every 0, writes a checkpoint: every
    --ckpt-every steps, after the last step, and after the step in which SIGTERM, Ctrl-C or `stop_at`
    (--stop-after) asked the run to stop; then Stopped is raised. resume = (manifest, tensors) of a
    checkpoint: go on after its step. The data order is not stored: it is regenerated from --seed.
    """
    device = args.device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, foreach=True)
    rng = random.Random(args.seed)
    per_step = args.batch_size * args.grad_accum
    total = n_steps(len(examples), args)
    order = []
    while len(order) < total * per_step:  # whole shuffled epochs, cut at the last step
        order += grouped_order(examples, per_step, rng)
    first, losses, last = 0, [], None
    if resume:
        meta, tensors = resume
        first, losses = meta["step"], [tuple(x) for x in meta["losses"]]
        load_optimizer(opt, meta["optimizer"], tensors)
    stop = []  # why the run must stop: set by the signal handler, acted on at the end of the step

    def on_signal(signum, frame):
        if stop:  # asked twice: stop now, without a checkpoint
            raise KeyboardInterrupt
        stop.append(signal.Signals(signum).name)

    catch = ckpt is not None and threading.current_thread() is threading.main_thread()
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if catch else {}
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    model.train()
    try:
        for step in (bar := tqdm(range(first, total), desc=desc, initial=first, total=total)):
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
            done = step + 1
            if stop_at is not None and done >= stop_at and not stop:
                stop.append("--stop-after")
            save = ckpt is not None and (done % args.ckpt_every == 0 or done == total or bool(stop))
            record = step % 10 == 0 or done == total  # reading the loss waits for the device: not every step
            if record or save:
                value = float(step_loss)
                if not math.isfinite(value) or (save and not all(bool(p.isfinite().all()) for p in params)):
                    kept = f"; the last good checkpoint, {last}, is kept" if last else ""
                    raise ValueError(f"non-finite loss ({value}) at step {done}/{total} of {desc}: lower --lr or check the data{kept}")
                if record:
                    losses.append((step, value))
                    bar.set_postfix(loss=f"{value:.3f}")
            if save:
                last = f"{ckpt(done, opt, losses)} (step {done})"
            if stop:
                raise Stopped(f"stopped by {stop[0]} after step {done}/{total} of {desc}; checkpoint {last}: "
                              "run the same command with --resume to continue")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    model.eval()
    return losses


# ---- checkpoints (--ckpt-every, --resume) ---------------------------------------------------------------
# OUT/ckpt holds one checkpoint. state-TASK-STEP.safetensors has the tensors: the trainable (LoRA) weights,
# torch's RNG states and the method's tensors, now ("now.") and as the task began ("start.": on --resume,
# begin_task and data run again from there), and the optimizer's state. manifest.json has the rest: task,
# step, losses, the finished tasks' results, the Python RNG states, the optimizer's settings, the config.
# It is written last and names the tensor file, so a run killed while writing keeps its previous
# checkpoint whole. No pickle anywhere. On a CPU a resumed run ends bitwise equal to an uninterrupted one.
RESUME_MAY_CHANGE = {"resume", "ckpt_every", "stop_after", "overwrite", "device", "compile", "eval_batch_size"}


class Stopped(Exception):
    """SIGTERM, Ctrl-C or --stop-after stopped the run after writing a checkpoint."""


def snapshot(model, method, prefix):
    """(tensors, JSON) of what training changes: the trainable weights, torch's RNG states, the method's state."""
    tensors = {f"{prefix}param.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tensors[f"{prefix}rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_initialized():
        tensors |= {f"{prefix}rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    state = method.state_dict()
    tensors |= {f"{prefix}method.{k}": v for k, v in state.items() if torch.is_tensor(v)}
    return tensors, {k: v for k, v in state.items() if not torch.is_tensor(v)}


def restore(model, method, tensors, meta, prefix):
    """Put back what snapshot(model, method, prefix) took."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(tensors[f"{prefix}param.{n}"])
    torch.set_rng_state(tensors[f"{prefix}rng.cpu"])
    for i in range(torch.cuda.device_count()):
        if f"{prefix}rng.cuda.{i}" in tensors:
            torch.cuda.set_rng_state(tensors[f"{prefix}rng.cuda.{i}"], i)
    n = len(f"{prefix}method.")
    method.load_state_dict({**meta, **{k[n:]: v for k, v in tensors.items() if k.startswith(f"{prefix}method.")}})


def optimizer_state(opt):
    """The optimizer's state_dict as (tensors, JSON)."""
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    rest = {i: {k: v for k, v in s.items() if not torch.is_tensor(v)} for i, s in sd["state"].items()}
    return tensors, {"state": rest, "param_groups": sd["param_groups"]}


def load_optimizer(opt, meta, tensors):
    state = {int(i): s for i, s in meta["state"].items()}  # JSON made the keys strings
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state[int(i)][name] = v
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}  # betas
              for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def write_checkpoint(path, tensors, meta):
    """The tensors to state-TASK-STEP.safetensors, then manifest.json naming it (the commit); older files go."""
    from safetensors.torch import save_file
    name = f"state-{meta['task']}-{meta['step']}.safetensors"
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path / f".{name}.tmp"))
    os.replace(path / f".{name}.tmp", path / name)
    write_json(path / "manifest.json", {**meta, "tensors": name})
    for f in path.iterdir():
        if f.name != name and (f.name.startswith("state-") or f.name.endswith(".tmp")):
            f.unlink()


def read_checkpoint(path):
    """(manifest, tensors) of the checkpoint in path."""
    from safetensors.torch import load_file
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(f"--resume: no checkpoint to resume from in {path} (no manifest.json)")
    meta = read_json(path / "manifest.json")
    keys = {"task", "step", "losses", "history", "steps_before", "train_seconds", "method", "start", "optimizer",
            "config", "data_hashes", "tensors"}  # what run() writes
    if missing := keys - meta.keys():
        raise ValueError(f"{path / 'manifest.json'}: not a checkpoint of this train.py (no {sorted(missing)[0]!r})")
    f = path / meta["tensors"]
    try:
        return meta, load_file(str(f))
    except Exception as e:  # missing, truncated, not safetensors: safetensors raises its own types
        raise ValueError(f"{f}: cannot read the checkpoint ({e})") from None


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


def check_device(device):
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a device (cpu, cuda, cuda:1, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available to this torch ({torch.__version__})")


def run(args):
    out, ckpt_dir = Path(args.out), Path(args.out) / "ckpt"
    if (out / "results.json").exists() and not args.overwrite:
        raise ValueError(f"--out {out}: holds a finished run (results.json); pass --overwrite to replace it")
    if args.ckpt_every < 0:
        raise ValueError(f"--ckpt-every must be >= 0 (0 = no checkpoints), got {args.ckpt_every}")
    if args.stop_after is not None and (args.stop_after <= 0 or not args.ckpt_every):
        raise ValueError("--stop-after N needs N > 0 and checkpoints (--ckpt-every > 0)")
    check_device(args.device)
    saved, saved_tensors = read_checkpoint(ckpt_dir) if args.resume else (None, None)
    if not args.resume:
        if (ckpt_dir / "manifest.json").exists() and not args.overwrite:
            raise ValueError(f"--out {out}: holds a stopped run ({ckpt_dir}); pass --resume to continue it or --overwrite to start over")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
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
    if args.max_len > model.config.max_seq_len:
        raise ValueError(f"--max-len {args.max_len} is longer than the model's context ({model.config.max_seq_len} "
                         f"tokens, max_position_embeddings in {model_dir / 'config.json'})")

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
    hashes = file_hashes([*tasks, args.safety_data, *args.harmful.split(","), args.sensitive,
                          *([poison_source] if args.scenario == "poisoned" else [])])
    config = {k: v for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE}  # a resumed run must match it
    if saved:
        was = saved["config"]
        if diff := sorted(k for k in config.keys() | was.keys() if config.get(k) != was.get(k)):
            k = diff[0]
            raise ValueError(f"--resume: the stopped run had --{k.replace('_', '-')} {was.get(k)!r}, this one "
                             f"{config.get(k)!r}; resume with the same flags")
        if saved["data_hashes"] != hashes:
            raise ValueError(f"--resume: the data files changed since the checkpoint in {ckpt_dir}; start over with --overwrite")
        if saved["task"] > 0 and getattr(METHODS[args.method], "changes_base_weights", False):
            raise ValueError(f"--resume: --method {args.method} changed the frozen weights at the end of a task, which "
                             "a checkpoint does not hold; its runs resume only in their first task")

    start = evaluate_start(model, tok, model_dir, harmful, sensitive, test_sets, args, eval_kw)

    lora.apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, tuple(args.lora_targets.split(",")))
    fwd = torch.compile(model) if args.compile else model  # compiled after LoRA injection; we save `model`
    method = METHODS[args.method](args)
    history, train_seconds, steps_before = [], 0.0, 0  # steps_before: optimizer steps of the finished tasks
    if saved:
        history, train_seconds, steps_before = saved["history"], saved["train_seconds"], saved["steps_before"]
    for i, (name, examples) in enumerate(zip(tasks, train_sets)):
        if saved and i < saved["task"]:
            continue  # finished before the stop: its results are in history
        task = tokenize(tok, examples, args.max_len, f"--task {name}")
        resume = saved if saved and i == saved["task"] else None
        if resume:  # as the task began: begin_task and data build what they built then (DER's top-k logits)
            restore(model, method, saved_tensors, resume["start"], "start.")
        task_start = snapshot(model, method, "start.")
        model.eval()  # begin_task measures the model (a Fisher, a teacher's logits): no dropout, in every task alike
        method.begin_task(model, task, memory)
        train_on = method.data(task, memory)
        if resume:  # then as at the checkpoint's step
            restore(model, method, saved_tensors, resume["method"], "now.")
        t0 = time.time()

        def save(step, opt, losses):  # OUT/ckpt after `step` optimizer steps of this task (train calls it)
            tensors, method_state = snapshot(model, method, "now.")
            opt_tensors, opt_state = optimizer_state(opt)
            write_checkpoint(ckpt_dir, {**tensors, **opt_tensors, **task_start[0]}, dict(
                task=i, step=step, losses=losses, history=history, steps_before=steps_before,
                train_seconds=train_seconds + time.time() - t0, method=method_state, start=task_start[1],
                optimizer=opt_state, config=config, data_hashes=hashes))
            return ckpt_dir

        losses = train(model, fwd, method, train_on, args, tok.pad_id, desc=f"task {i + 1}/{len(tasks)} {name} [{args.method}]",
                       ckpt=save if args.ckpt_every else None, resume=(resume, saved_tensors) if resume else None,
                       stop_at=args.stop_after - steps_before if args.stop_after else None)
        train_seconds += time.time() - t0
        steps_before += n_steps(len(train_on), args)
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
               "data_hashes": hashes}
    write_json(out / "results.json", results)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the run is finished: OUT holds a checkpoint or results.json
    print()
    print_table([("starting model", start)] + [(f"after {h['task']} ({args.method}, {args.scenario})", h) for h in history])
    print(f"train {train_seconds:.0f}s, total {results['total_seconds']:.0f}s; wrote {out / 'results.json'}")
    return results


def main(argv=None):
    args = get_args(argv)
    try:
        return run(args)
    except Stopped as e:  # a checkpoint was written: one line on how to go on, exit status 1
        sys.exit(str(e))
    except (ValueError, OSError) as e:  # expected user errors: one line, no traceback
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")


if __name__ == "__main__":
    main()
