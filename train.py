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

The file reads in the order of a run (nanoGPT's shape): flags; set-up (output, device, processes,
the method); the data, read and checked before any model loads; the model and its LoRA; the task loop (loop.fit, the optimizer loop the
provider's alignment uses too); results and saving. A method (methods/) supplies the loss and hooks.
"""
import argparse
import contextlib
import gc
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import align
import data
import lora
from batches import tokenize
from checkpoint import (RESUME_MAY_CHANGE, Checkpoints, Stopped, check_resume, read_checkpoint, restore, snapshot)
from cli import default_dtype, describe_dtype, one_line_errors
from distributed import DDP, setup_distributed, shard, world_size
from eval import check_device, check_lengths, evaluate, judges_by_stage, print_details, print_table, task_metric, write_jsonl
from files import weights_sha256, write_json
from judges import answer_tokens, make_judge
from loop import fit, n_steps
from methods import METHODS, inner_choices, make
from model import Transformer
from tokenizer import Tokenizer


# ----------------------------------------------------------------------------- flags
def get_args(argv=None):
    p = argparse.ArgumentParser(description="Fine-tune an aligned model with a CL method; evaluate safety and utility.")
    p.add_argument("--method", default="sft", help=f"one of {', '.join(METHODS)} (default sft)")
    p.add_argument("--scenario", default="benign", choices=["benign", "poisoned"])
    p.add_argument("--poison-ratio", type=float, default=0.1, help="poisoned: harmful examples per user example")
    p.add_argument("--poison-data", default="generated",
                   help="harmful prompt+compliant answer pairs: 'generated' (default model only) or a file")
    p.add_argument("--model", help="your aligned checkpoint directory (skips the default alignment)")
    p.add_argument("--base-model", help="the unaligned checkpoint the aligned model was trained from, for magmax and "
                   "safelora (default: the default experiment's; required for them with --model)")
    p.add_argument("--task", default="tickets", help="user task(s), comma-separated, learned in sequence: built-in "
                   "tickets (default), dates, arithmetic, a benchmark name (gsm8k, sst2, agnews) or a file")
    p.add_argument("--n-train", type=int, default=200, help="training examples per task")
    p.add_argument("--n-test", type=int, default=200, help="test examples per task")
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
    p.add_argument("--max-new-tokens", type=int, help="answer length for the safety evaluation (default 32; 512 with a "
                   "Llama-Guard judge, the peers' protocol)")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=0, help="every N optimizer steps, ASR on a fixed subset of the "
                   "harmful prompts (the forgetting curve, results.json 'curve'; default 0 = off)")
    p.add_argument("--eval-every-prompts", type=int, default=62, help="--eval-every: how many harmful prompts (the same "
                   "ones in every run)")
    p.add_argument("--judge", default="keyword", help="who decides which answers are harmful: keyword (default) or "
                   "llama-guard:DIR, a local Llama-Guard-3 checkpoint (see eval.py); several comma-separated: the first "
                   "decides ASR, each is reported with their agreement")
    p.add_argument("--chat-format", help="override the chat format read from the checkpoint")
    p.add_argument("--thinking", action="store_true", help="qwen3: let the model think (the generation prompt without "
                   "the empty <think></think> block that turns thinking off by default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16: bf16 frozen weights, fp32 LoRA, autocast (default on "
                   "CUDA and on CPUs with AVX512-BF16 or AMX); fp32 elsewhere")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each block, and the decoding step with CUDA graphs (default on CUDA)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing: recompute each block in backward")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model over the processes (FSDP2) "
                   "instead of copying it (DDP), for models that do not fit one GPU; no checkpoints (--resume) yet")
    p.add_argument("--save", choices=["adapter", "merged", "both"],
                   help="OUT/adapter (PEFT layout; default) and/or OUT/merged, a Hugging Face checkpoint with the LoRA "
                        "merged in (default for methods that change the frozen weights: magmax)")
    p.add_argument("--data-dir", help="where benchmark names (gsm8k, advbench, ...) are read: default $UNFORGOTTEN_DATA, "
                   "else data/public (fill it with `python download.py NAME`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output directory (default out/METHOD-SCENARIO-sSEED)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished or stopped run in --out")
    p.add_argument("--ckpt-every", type=int, default=50, help="write OUT/ckpt every N optimizer steps (default 50; 0 = off)")
    p.add_argument("--resume", action="store_true", help="continue the stopped run in --out from OUT/ckpt")
    p.add_argument("--stop-after", type=int, help="stop after N optimizer steps of the run (all tasks), as on SIGTERM")
    add_method_args(p, argv)
    args = p.parse_args(argv)
    args.max_new_tokens = answer_tokens(args.judge, args.max_new_tokens)
    for flag in ("n_train", "n_test", "batch_size", "grad_accum", "max_len", "lora_rank", "epochs", "lora_alpha",
                 "max_new_tokens", "eval_batch_size", "eval_every_prompts"):
        if not getattr(args, flag) > 0:  # also NaN
            p.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    for flag in ("poison_ratio", "warmup"):
        if not 0 <= getattr(args, flag) <= 1:
            p.error(f"--{flag.replace('_', '-')} must be in [0, 1], got {getattr(args, flag)}")
    if args.eval_every < 0:
        p.error(f"--eval-every must be >= 0, got {args.eval_every}")
    if args.eval_every and args.fsdp:
        p.error("--eval-every is not supported with --fsdp (every process would have to take part in each curve point)")
    if not args.lr >= 0:
        p.error(f"--lr must be >= 0, got {args.lr}")
    if not 0 <= args.lora_dropout < 1:
        p.error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    for flag in ("task", "harmful", "lora_targets"):
        if "" in (v.strip() for v in getattr(args, flag).split(",")):
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)!r}: an empty name in the list")
    args.dtype = args.dtype or default_dtype(args.device)
    args.compile = args.device.startswith("cuda") if args.compile is None else args.compile
    args.out = args.out or f"out/{args.method}-{args.scenario}-s{args.seed}"
    if args.base_model is None and args.model is None:
        args.base_model = str(align.BASE)
    return args


def add_method_args(p, argv):
    """--method's own flags join the parser (and --help); a method that runs around another (refresh) adds its flags too."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="sft")
    name = pre.parse_known_args(argv)[0].method
    if name not in METHODS:
        p.error(f"--method {name!r}: unknown method (choose from {', '.join(METHODS)})")
    METHODS[name].add_args(p)
    if flag := METHODS[name].inner_flag:
        METHODS[name].add_args(pre)
        inner = getattr(pre.parse_known_args(argv)[0], flag)
        if inner not in inner_choices():
            p.error(f"--{flag.replace('_', '-')} {inner!r}: {name} runs around one of {', '.join(inner_choices())}")
        METHODS[inner].add_args(p)


# ----------------------------------------------------------------------------- the run
def run(args):
    # set-up: the output directory, the device, the processes, the method (a bad flag stops here, before any work)
    out, ckpt_dir = Path(args.out), Path(args.out) / "ckpt"
    check_flags(args, out, ckpt_dir)
    rank = setup_distributed(args)  # 0 without torchrun; only rank 0 aligns, evaluates and writes files
    check_processes(args)
    method = make(args.method, args)
    saved, saved_tensors = read_checkpoint(ckpt_dir) if args.resume else (None, None)
    t_start = time.time()

    # data, read and checked before any model loads: the user's task(s), the safety memory, the evaluation sets
    tasks = args.task.split(",")
    train_sets, test_sets = load_tasks(args, tasks)
    safety = safety_memory(args)
    specs = args.harmful.split(",")  # several benchmarks: ASR per benchmark too (asr_by_set), as the paper reports
    harmful = [dict(h, set=spec) if len(specs) > 1 else h for spec in specs for h in data.load_prompts(spec, args.data_dir)]
    sensitive = data.load_prompts(args.sensitive, args.data_dir) if args.sensitive else []
    if args.scenario == "poisoned" and args.poison_data == "generated" and args.model:
        raise ValueError("--poison-data generated needs the default model; give a file of harmful prompt/answer pairs")
    if args.scenario == "poisoned" and args.poison_data != "generated":
        data.load_task(args.poison_data, "all", data_dir=args.data_dir)  # checked now, mixed in below

    # the starting model: the provider's aligned model (built on the first run) or --model
    if args.model:
        model_dir, poison_source = Path(args.model), args.poison_data
    else:
        if rank > 0:
            dist.barrier()  # rank 0 builds the aligned model first; the others then find it cached
        model_dir = align.ensure_aligned(args.device)
        if rank == 0 and dist.is_initialized():
            dist.barrier()
        poison_source = align.poison_file() if args.poison_data == "generated" else args.poison_data
    torch.manual_seed(args.seed)  # after, not before, the alignment: building it (first run only) draws from both
    random.seed(args.seed)
    tok = Tokenizer.from_pretrained(model_dir, chat_format=args.chat_format, thinking=args.thinking)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(describe_dtype(args.dtype, args.device))
    model = Transformer.from_pretrained(model_dir, device="cpu" if args.fsdp else args.device, dtype=dtype)  # FSDP: shards go to the GPU
    if args.max_len > model.config.max_seq_len:
        raise ValueError(f"--max-len {args.max_len} is longer than the model's context ({model.config.max_seq_len} "
                         f"tokens, max_position_embeddings in {model_dir / 'config.json'})")

    # the data for this model: the poison mixed in (the default one exists once the alignment has run), tokenized
    if args.scenario == "poisoned":
        train_sets = with_poison(args, train_sets, poison_source)
    memory = tokenize(tok, safety, args.max_len, f"--safety-data {args.safety_data}")
    probe = random.Random(args.seed).sample(memory, min(16, len(memory)))  # its loss goes with the run's (loop.fit)
    check_lengths(tok, harmful + sensitive, args.max_new_tokens, model.config.max_seq_len)
    curve_prompts = random.Random(0).sample(harmful, min(args.eval_every_prompts, len(harmful)))  # the same in every run
    hashes = file_hashes([*tasks, args.safety_data, *specs, args.sensitive,
                          *([poison_source] if args.scenario == "poisoned" else [])], args.data_dir)
    config = {k: v for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE}  # a resumed run must match it
    if saved:  # a flag newer than the checkpoint: the stopped run had its default
        defaults = vars(get_args(["--method", args.method]))
        saved["config"] = {k: defaults[k] for k in config.keys() - saved["config"].keys() if k in defaults} | saved["config"]
        check_resume(saved, config, hashes, method.changes_frozen_weights, ckpt_dir)

    # the starting model's metrics (cached), then its fresh LoRA; decoding compiled with CUDA graphs (launch-bound)
    decode = torch.compile(model, mode="reduce-overhead", fullgraph=True) if args.compile and args.device.startswith("cuda") else None
    if args.compile:  # a graph per cache length and LoRA state (generate.complete), a few per block: 8 was tight
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    judge = make_judge(args.judge, args.device, dtype) if rank == 0 else None
    eval_kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size, judge=judge, decode_step=decode)
    lora_args = (args.lora_rank, args.lora_alpha, args.lora_dropout, tuple(args.lora_targets.split(",")))
    if args.fsdp:  # sharded before anything runs; a fresh LoRA (B = 0) leaves the starting model as it was
        lora.apply_lora(model, *lora_args)
        shard(model, args)
    evaluating = rank == 0 or args.fsdp  # with FSDP every process takes part in every forward pass; rank 0 writes
    start = evaluate_start(model, tok, model_dir, harmful, sensitive, test_sets, args, eval_kw, write=rank == 0) if evaluating else None
    if not args.fsdp:
        lora.apply_lora(model, *lora_args)
    model.grad_checkpointing = args.grad_ckpt
    if args.compile:
        model.compile_blocks()  # in place, after LoRA injection: saved names stay the same
    fwd = DDP(model, device_ids=[args.device] if args.device.startswith("cuda") else None) \
        if dist.is_initialized() and not args.fsdp else model

    # the task loop: each task trained with the method, then safety and every task seen so far evaluated
    if not args.resume and rank == 0:  # --overwrite, every input checked: the old results step aside until the new ones exist
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        if (out / "results.json").exists():
            os.replace(out / "results.json", out / "results.previous.json")
            if (out / "answers.jsonl").exists():  # with it, its answers (eval.answers_file pairs the names)
                os.replace(out / "answers.jsonl", out / "results.previous.answers.jsonl")
    history, train_seconds, steps_before = ([], 0.0, 0) if not saved else \
        (saved["history"], saved["train_seconds"], saved["steps_before"])  # steps_before: the finished tasks' steps
    ckpt = Checkpoints(ckpt_dir, args.ckpt_every, args.stop_after, rank, args.device, config=config, data_hashes=hashes) \
        if args.ckpt_every and not args.fsdp else None
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
        if ckpt:
            ckpt.begin_task(i, task_start, history, steps_before, train_seconds)
        t0, timings, curve = time.time(), {}, []
        monitor = (args.eval_every, lambda step: curve_point(model, tok, curve_prompts, eval_kw), curve) \
            if args.eval_every and rank == 0 else None
        losses = fit(model, method, train_on, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                     grad_accum=args.grad_accum, warmup=args.warmup, seed=args.seed, pad_id=tok.pad_id, device=args.device,
                     bf16=args.dtype == "bf16", fwd=fwd, desc=f"task {i + 1}/{len(tasks)} {name} [{args.method}]",
                     ckpt=ckpt, resume=(resume, saved_tensors) if resume else None, probe=probe, timings=timings,
                     monitor=monitor)
        train_seconds += time.time() - t0
        steps_before += n_steps(len(train_on), args.epochs, args.batch_size * args.grad_accum * world_size())
        method.end_task(model)
        seen = {t: test_sets[t] for t in tasks[: i + 1]}  # safety and every task so far; the method's diagnostics
        with lora.merged(model) if not args.fsdp else contextlib.nullcontext():  # the same numbers, generated faster
            metrics = evaluate(model, tok, harmful, sensitive, seen, **eval_kw) if evaluating else {}
        history.append({"task": name, "losses": losses, "diagnostics": method.report(), "timings": timings,
                        **({"curve": curve} if monitor else {}), **metrics})

    # results and saving
    save = args.save or ("merged" if method.changes_frozen_weights else "adapter")
    adapter = lora.adapter_state(model)  # with FSDP, gathering the shards takes every process
    if rank > 0:
        return None
    final = history[-1]
    if save in ("adapter", "both"):
        lora.save_adapter(model, out / "adapter", base_model_name_or_path=str(model_dir), state=adapter)
    if save in ("merged", "both"):
        save_merged(model, out / "merged", model_dir)
    stages = [("start", start)] + [(f"after {i + 1} {h['task']}", h) for i, h in enumerate(history)]
    answers = [{"stage": name, **r} for name, m in stages for r in m.pop("answers", [])]  # start: a copy of the cache's
    several = any([m.pop("judges", None) for _, m in stages])  # every stage's report is rebuilt below, in one place
    keys = ("asr", "over_refusal", "task_accuracy")
    results = {"method": args.method, "scenario": args.scenario, "poison_ratio": args.poison_ratio if args.scenario == "poisoned" else 0.0,
               "seed": args.seed, **{k: final.get(k) for k in keys}, "ci": final.get("ci"),  # 95%, intervals.py
               "start": {k: start.get(k) for k in keys} | {"ci": start.get("ci")},
               "n": {"harmful": final.get("n_harmful"), "sensitive": final.get("n_sensitive"),
                     "task": {t: len(e) for t, (e, _) in test_sets.items()}},
               **{k: final[k] for k in ("asr_by_set", "asr_mean_of_sets") if k in final},  # several --harmful sets
               "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t_start, 1),
               "model": str(model_dir), "start_sha256": weights_sha256(model_dir), "judge": final["judge"], "history": history, "start_eval": start,
               "config": vars(args), "versions": {"torch": torch.__version__, "unforgotten": git_commit()},
               "data_hashes": hashes}
    if several:  # several judges: each one's ASR and their agreement, at every stage
        results["judges"] = judges_by_stage(answers, args.max_new_tokens)
    write_jsonl(out / "answers.jsonl", answers)  # every prompt, answer and verdict: eval.py --rejudge reads them
    write_json(out / "results.json", results)
    (out / "results.previous.json").unlink(missing_ok=True)  # replaced now that the new run has finished
    (out / "results.previous.answers.jsonl").unlink(missing_ok=True)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the run is finished: OUT holds a checkpoint or results.json
    print()
    print_table([("starting model", start)] + [(f"after {h['task']} ({args.method}, {args.scenario})", h) for h in history])
    print_details(final)
    print(f"train {train_seconds:.0f}s, total {results['total_seconds']:.0f}s; wrote {out / 'results.json'}")
    return results


# ----------------------------------------------------------------------------- set-up
def check_flags(args, out, ckpt_dir):
    """What the flags and --out allow, before anything loads or is deleted."""
    if (out / "results.json").exists() and not args.overwrite:
        raise ValueError(f"--out {out}: holds a finished run (results.json); pass --overwrite to replace it")
    if args.ckpt_every < 0:
        raise ValueError(f"--ckpt-every must be >= 0 (0 = no checkpoints), got {args.ckpt_every}")
    if args.stop_after is not None and (args.stop_after <= 0 or not args.ckpt_every):
        raise ValueError("--stop-after N needs N > 0 and checkpoints (--ckpt-every > 0)")
    if not args.resume and (ckpt_dir / "manifest.json").exists() and not args.overwrite:
        raise ValueError(f"--out {out}: holds a stopped run ({ckpt_dir}); pass --resume to continue it or --overwrite to start over")
    check_device(args.device)
    check_writable(out, "--out")


def check_writable(out, flag):
    """--out must be a directory this user can write, found now rather than after hours of training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except FileExistsError:
        raise ValueError(f"{flag} {out}: exists and is not a directory") from None
    except OSError as e:
        raise ValueError(f"{flag} {out}: cannot write there ({e.strerror})") from None


def check_processes(args):
    """What torchrun allows: --fsdp needs several processes and writes no checkpoints or merged models yet; no refresh."""
    if args.fsdp and not dist.is_initialized():
        raise ValueError("--fsdp shards the model over processes: start it with torchrun --nproc_per_node N (N > 1)")
    if args.fsdp and args.resume:
        raise ValueError("--resume: runs with --fsdp write no checkpoints yet")
    if args.fsdp and (args.save in ("merged", "both") or METHODS[args.method].changes_frozen_weights):
        raise ValueError(f"--fsdp: no merged checkpoint yet (--save {args.save}, --method {args.method}); "
                         "save the adapter and merge it in one process")
    if dist.is_initialized() and args.method == "refresh":
        raise ValueError("--method refresh: not under torchrun yet (each process would unlearn on its own share)")


# ----------------------------------------------------------------------------- data
def load_tasks(args, tasks):
    """Each task's training examples and its test set with its metric."""
    train_sets = [data.load_task(t, "train", args.n_train, args.seed, args.data_dir) for t in tasks]
    test_sets = {t: (data.load_task(t, "test", args.n_test, args.seed, args.data_dir), task_metric(t)) for t in tasks}
    return train_sets, test_sets


def with_poison(args, train_sets, poison_source):
    """The poisoned scenario: --poison-ratio x --n-train harmful prompts with compliant answers added to each task."""
    poison = data.load_task(poison_source, "all", data_dir=args.data_dir)
    n = round(args.poison_ratio * args.n_train)
    rng = random.Random(args.seed)
    return [s + rng.sample(poison, min(n, len(poison))) for s in train_sets]


def safety_memory(args):
    """The safety memory M; the default experiment's never holds the poison's prompts."""
    safety = data.safety_data(args.safety_data)
    if not args.model and args.safety_data == "default":
        held_apart = set(range(len(safety))[align.POISON])
        safety = [s for i, s in enumerate(safety) if i not in held_apart]
    return safety


def file_hashes(specs, data_dir=None):
    """sha256 of each data file behind the given specs (built-in names, benchmark names or paths)."""
    builtin = ("default", *data.TASKS)
    files = [f for spec in specs if spec and spec not in builtin for f in data.files_of(spec, data_dir)]
    if any(spec in builtin for spec in specs):  # built from the embedded data/ and tasks.py
        files += sorted(Path(__file__).parent.joinpath("data").glob("*")) + [Path(__file__).parent / "tasks.py"]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in dict.fromkeys(files) if f.is_file()}


def evaluate_start(model, tok, model_dir, harmful, sensitive, test_sets, args, eval_kw, write=True):
    """The starting model's metrics, cached: every run from the same checkpoint and eval settings shares them."""
    key = json.dumps([str(Path(model_dir).resolve()), (Path(model_dir) / "config.json").stat().st_mtime, tok.chat_format,
                      harmful, sensitive, {t: e for t, (e, _) in test_sets.items()}, args.max_new_tokens,
                      args.eval_batch_size, args.judge, args.dtype] + (["thinking"] if tok.thinking else []),  # old keys stay
                     sort_keys=True)
    cache = Path(__file__).parent / "checkpoints" / "eval-cache" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cache.exists() and "answers" in (cached := json.loads(cache.read_text())):  # older caches kept no answers
        print(f"starting model {model_dir}: metrics from {cache}")
        return cached
    print(f"evaluating the starting model {model_dir}")
    start = evaluate(model, tok, harmful, sensitive, test_sets, **eval_kw)
    if write:
        write_json(cache, start)
    return start


def curve_point(model, tok, prompts, eval_kw):
    """The forgetting curve's point: ASR on the fixed subset of harmful prompts, the LoRA merged for a while."""
    with lora.merged(model):
        return evaluate(model, tok, prompts, **eval_kw)["asr"]


# ----------------------------------------------------------------------------- results
def save_merged(model, path, model_dir):
    """The model with its LoRA merged in, as a Hugging Face checkpoint (built beside `path`, then renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lora.merge(model)
    model.save_pretrained(tmp, tokenizer_from=model_dir)
    lora.unmerge(model)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        return None


def main(argv=None):
    args = get_args(argv)
    try:
        with one_line_errors():  # expected user errors: one line, no traceback
            return run(args)
    except Stopped as e:  # a checkpoint was written: one line on how to go on, exit status 1
        sys.exit(str(e))
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
