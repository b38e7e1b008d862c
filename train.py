"""Fine-tune a safety-aligned chat model on a user's task with a continual-learning method, and
measure what it forgot ("Unforgotten Safety", Alssum et al. 2025).

    python train.py --method replay                       # the default experiment, benign user data
    python train.py --method der --scenario poisoned      # 1 harmful example per 10 of the user's
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
import gc
import hashlib
import json
import math
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
import torch.distributed as dist
from tqdm import tqdm

import data
import lora
from distributed import DDP, setup_distributed, shard, world_size
from eval import evaluate, make_judge, print_details, print_table
from methods import METHODS
from methods.base import collate, to_device
from checkpoint import (RESUME_MAY_CHANGE, Stopped, load_optimizer, optimizer_state, read_checkpoint, restore, snapshot,
                        write_checkpoint)
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
    p.add_argument("--judge", default="keyword", help="who decides which answers are harmful: keyword (default) or "
                   "llama-guard:DIR, a local Llama-Guard-3 checkpoint (see eval.py)")
    p.add_argument("--chat-format", help="override the chat format read from the checkpoint")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16 = autocast (default on CUDA); fp32 default on CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each block, and the decoding step with CUDA graphs (default on CUDA)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing: recompute each block in backward")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model over the processes (FSDP2) "
                   "instead of copying it (DDP), for models that do not fit one GPU; no checkpoints (--resume) yet")
    p.add_argument("--save", choices=["adapter", "merged", "both"],
                   help="OUT/adapter (PEFT layout; default) and/or OUT/merged, a Hugging Face checkpoint with the LoRA "
                        "merged in (default for methods that change the frozen weights: magmax)")
    p.add_argument("--data-dir", help="where benchmark names (gsm8k, advbench, ...) are read: default $UNFORGOTTEN_DATA, "
                   "else data/public (fill it with `python data.py download NAME`)")
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
    """Optimizer steps of one task of n_examples (a step takes batch x accumulation x processes examples)."""
    return max(1, math.ceil(args.epochs * n_examples / (args.batch_size * args.grad_accum * world_size())))


def train(model, fwd, method, examples, args, pad_id, desc="training", ckpt=None, resume=None, stop_at=None):
    """Optimise the trainable parameters on `examples` with `method`; returns per-step losses.

    ckpt(step, opt, losses) -> path, given by run() unless --ckpt-every 0, writes a checkpoint: every
    --ckpt-every steps, after the last step, and after the step in which SIGTERM, Ctrl-C or `stop_at`
    (--stop-after) asked the run to stop; then Stopped is raised. resume = (manifest, tensors) of a
    checkpoint: go on after its step. The data order is not stored: it is regenerated from --seed.

    Under torchrun, `fwd` is the DistributedDataParallel model and each process takes its share of
    every step's examples (--batch-size is per process); DDP averages the gradients, so each process
    divides its summed loss by the step's target tokens / processes: the sum of the shares, as one
    process would compute it. Methods draw the same memory batches in every process (same seed).
    """
    device = args.device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.startswith("cuda")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=cuda, foreach=not cuda)
    rng = random.Random(args.seed)
    per_step = args.batch_size * args.grad_accum * world
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
        for step in (bar := tqdm(range(first, total), desc=desc, initial=first, total=total, disable=rank > 0)):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, args)
            chosen = [examples[i] for i in order[step * per_step: (step + 1) * per_step]]
            norm = max(1, sum(sum(l != -100 for l in e["labels"][1:]) for e in chosen))  # target tokens in the step
            step_loss = 0.0
            for m in range(args.grad_accum):
                k = (m * world + rank) * args.batch_size  # this process's share of the step
                micro = chosen[k: k + args.batch_size]
                batch = to_device(collate(micro, pad_id, norm=norm / world, frac=1 / args.grad_accum), device)
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
            if world > 1:  # every process stops after the same step (a signal may reach them at different steps)
                flag = torch.tensor([float(bool(stop))], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                if flag.item() and not stop:
                    stop.append("a signal to another process")
            save = ckpt is not None and (done % args.ckpt_every == 0 or done == total or bool(stop))
            record = step % 10 == 0 or done == total  # reading the loss waits for the device: not every step
            if record or save:
                if world > 1:  # the mean over processes: each one's loss counts its share of the tokens `world` times
                    step_loss = torch.as_tensor(step_loss, device=device).clone()
                    dist.all_reduce(step_loss)
                    step_loss /= world
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


def file_hashes(specs, data_dir=None):
    """sha256 of each data file behind the given specs (built-in names, benchmark names or paths)."""
    files = [f for spec in specs if spec and spec not in ("default", "arithmetic") for f in data.files_of(spec, data_dir)]
    if "default" in specs or "arithmetic" in specs:  # built from the embedded data/ and arithmetic.py
        files += sorted(Path(__file__).parent.joinpath("data").glob("*")) + [Path(__file__).parent / "arithmetic.py"]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in dict.fromkeys(files) if f.is_file()}


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        return None


def evaluate_start(model, tok, model_dir, harmful, sensitive, test_sets, args, eval_kw, write=True):
    """The starting model's metrics, cached: every run from the same checkpoint and eval settings shares them."""
    key = json.dumps([str(Path(model_dir).resolve()), (Path(model_dir) / "config.json").stat().st_mtime, tok.chat_format,
                      harmful, sensitive, {t: e for t, (e, _) in test_sets.items()}, args.max_new_tokens,
                      args.eval_batch_size, args.judge], sort_keys=True)
    cache = Path(__file__).parent / "checkpoints" / "eval-cache" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cache.exists():
        print(f"starting model {model_dir}: metrics from {cache}")
        return json.loads(cache.read_text())
    print(f"evaluating the starting model {model_dir}")
    start = evaluate(model, tok, harmful, sensitive, test_sets, **eval_kw)
    if write:
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
    rank = setup_distributed(args)  # 0 without torchrun; only rank 0 aligns, evaluates and writes files
    if args.fsdp and not dist.is_initialized():
        raise ValueError("--fsdp shards the model over processes: start it with torchrun --nproc_per_node N (N > 1)")
    if args.fsdp and args.resume:
        raise ValueError("--resume: runs with --fsdp write no checkpoints yet")
    if args.fsdp and (args.save in ("merged", "both") or METHODS[args.method].changes_base_weights):
        raise ValueError(f"--fsdp: no merged checkpoint yet (--save {args.save}, --method {args.method}); "
                         "save the adapter and merge it in one process")
    saved, saved_tensors = read_checkpoint(ckpt_dir) if args.resume else (None, None)
    if not args.resume:
        if (ckpt_dir / "manifest.json").exists() and not args.overwrite:
            raise ValueError(f"--out {out}: holds a stopped run ({ckpt_dir}); pass --resume to continue it or --overwrite to start over")
        if rank == 0:  # --overwrite: the old run goes now, so a stopped new run never sits beside old results
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            (out / "results.json").unlink(missing_ok=True)
    t_start = time.time()
    if args.model:
        model_dir, poison_source = Path(args.model), args.poison_data
    else:
        import align
        if rank > 0:
            dist.barrier()  # rank 0 builds the aligned model first; the others then find it cached
        model_dir = align.ensure_aligned(args.device)
        if rank == 0 and dist.is_initialized():
            dist.barrier()
        poison_source = align.poison_file() if args.poison_data == "generated" else args.poison_data
    torch.manual_seed(args.seed)  # after, not before, the alignment: building it (first run only) draws from both
    random.seed(args.seed)
    tok = Tokenizer.from_pretrained(model_dir, chat_format=args.chat_format)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = Transformer.from_pretrained(model_dir, device="cpu" if args.fsdp else args.device, dtype=dtype)  # FSDP: shards go to the GPU
    if args.max_len > model.config.max_seq_len:
        raise ValueError(f"--max-len {args.max_len} is longer than the model's context ({model.config.max_seq_len} "
                         f"tokens, max_position_embeddings in {model_dir / 'config.json'})")

    # data: the user's task(s), the poison, the safety memory, the evaluation sets
    tasks = args.task.split(",")
    train_sets = [data.load_task(t, "train", args.n_train, args.seed, args.data_dir) for t in tasks]
    test_sets = {t: (data.load_task(t, "test", args.n_test, args.seed, args.data_dir), data.task_metric(t)) for t in tasks}
    if args.scenario == "poisoned":
        if poison_source == "generated":
            raise ValueError("--poison-data generated needs the default model; give a file of harmful prompt/answer pairs")
        poison = data.load_task(poison_source, "all", data_dir=args.data_dir)  # harmful prompts with compliant answers
        n = round(args.poison_ratio * args.n_train)
        rng = random.Random(args.seed)
        train_sets = [s + rng.sample(poison, min(n, len(poison))) for s in train_sets]
    safety = data.safety_data(args.safety_data)
    if not args.model and args.safety_data == "default":  # the memory never holds the poison's prompts
        held_apart = set(range(len(safety))[align.POISON])
        safety = [s for i, s in enumerate(safety) if i not in held_apart]
    memory = tokenize(tok, safety, args.max_len, f"--safety-data {args.safety_data}")
    specs = args.harmful.split(",")  # several benchmarks: ASR per benchmark too (asr_by_set), as the paper reports
    harmful = [dict(h, set=spec) if len(specs) > 1 else h for spec in specs for h in data.load_prompts(spec, args.data_dir)]
    sensitive = data.load_prompts(args.sensitive, args.data_dir) if args.sensitive else []
    # the decoding step compiled with CUDA graphs: generation of a small model is kernel-launch bound
    decode = torch.compile(model, mode="reduce-overhead", fullgraph=True) if args.compile and args.device.startswith("cuda") else None
    judge = make_judge(args.judge, args.device, dtype) if rank == 0 else None
    eval_kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size, judge=judge, decode_step=decode)
    hashes = file_hashes([*tasks, args.safety_data, *args.harmful.split(","), args.sensitive,
                          *([poison_source] if args.scenario == "poisoned" else [])], args.data_dir)
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

    lora_args = (args.lora_rank, args.lora_alpha, args.lora_dropout, tuple(args.lora_targets.split(",")))
    if args.fsdp:  # sharded before anything runs; a fresh LoRA (B = 0) leaves the starting model as it was
        lora.apply_lora(model, *lora_args)
        shard(model, args)
    # with FSDP every process takes part in every forward pass: all evaluate, rank 0 writes
    evaluating = rank == 0 or args.fsdp
    start = evaluate_start(model, tok, model_dir, harmful, sensitive, test_sets, args, eval_kw, write=rank == 0) if evaluating else None
    if not args.fsdp:
        lora.apply_lora(model, *lora_args)
    model.grad_checkpointing = args.grad_ckpt
    if args.compile:
        model.compile_blocks()  # in place, after LoRA injection: saved names stay the same
    fwd = DDP(model, device_ids=[args.device] if args.device.startswith("cuda") else None) \
        if dist.is_initialized() and not args.fsdp else model
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
            if rank > 0:
                return ckpt_dir
            tensors, method_state = snapshot(model, method, "now.")
            opt_tensors, opt_state = optimizer_state(opt)
            write_checkpoint(ckpt_dir, {**tensors, **opt_tensors, **task_start[0]}, dict(
                task=i, step=step, losses=losses, history=history, steps_before=steps_before,
                train_seconds=train_seconds + time.time() - t0, method=method_state, start=task_start[1],
                optimizer=opt_state, config=config, data_hashes=hashes))
            return ckpt_dir

        losses = train(model, fwd, method, train_on, args, tok.pad_id, desc=f"task {i + 1}/{len(tasks)} {name} [{args.method}]",
                       ckpt=save if args.ckpt_every and not args.fsdp else None, resume=(resume, saved_tensors) if resume else None,
                       stop_at=args.stop_after - steps_before if args.stop_after else None)
        train_seconds += time.time() - t0
        steps_before += n_steps(len(train_on), args)
        method.end_task(model)
        seen = {t: test_sets[t] for t in tasks[: i + 1]}
        history.append({"task": name, "losses": losses, **(evaluate(model, tok, harmful, sensitive, seen, **eval_kw) if evaluating else {})})
    save = args.save or ("merged" if method.changes_base_weights else "adapter")
    adapter = lora.adapter_state(model)  # with FSDP, gathering the shards takes every process
    if rank > 0:
        return None
    final = history[-1]
    if save in ("adapter", "both"):
        lora.save_adapter(model, out / "adapter", base_model_name_or_path=str(model_dir), state=adapter)
    if save in ("merged", "both"):
        save_merged(model, out / "merged", model_dir)
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
    print_details(final)
    print(f"train {train_seconds:.0f}s, total {results['total_seconds']:.0f}s; wrote {out / 'results.json'}")
    return results


def save_merged(model, path, model_dir):
    """The model with its LoRA merged in, as a Hugging Face checkpoint (built beside `path`, then renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lora.merge(model)
    model.save_pretrained(tmp, tokenizer_from=model_dir)
    lora.unmerge(model)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


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
    finally:
        if dist.is_initialized():
            # free the DDP / FSDP objects (held in reference cycles) while the interpreter is alive: left to
            # interpreter exit, their process group's gloo threads can abort the process (SIGABRT, seen in CI)
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
