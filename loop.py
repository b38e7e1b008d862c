"""The optimizer loop, one for the provider's alignment (align.py) and the user's run (train.py).

fit() trains a model's trainable (LoRA) parameters on examples with a method (methods/): AdamW,
linear warm-up then cosine decay to 10% of the peak rate, length-grouped batches, gradient
accumulation weighted by target tokens (torchtune's recipes), gradient clipping at 1. The method
gives the losses; this loop owns backward, accumulation, autocast, the optimizer and the schedule.

Under torchrun, `fwd` is the DDP model and each process takes its share of every step's examples
(the batch size is per process). DDP averages the gradients, so a process weights a micro-batch by
its target tokens x processes / the step's target tokens: the mean over processes is then the step
one process would take. Methods draw the same memory batches in every process (same seed).
"""
import math
import random
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

from batches import collate, grouped_order, n_targets
from checkpoint import load_optimizer
from methods.method import nll


def lr_at(step, total, lr, warmup):
    """Linear warm-up over the first `warmup` share of the steps, then cosine decay to 10% of lr."""
    warm = max(1, int(warmup * total))
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm))))


def n_steps(n_examples, epochs, per_step):
    """Optimizer steps of a task of n_examples, per_step examples a step (batch x accumulation x processes)."""
    return max(1, math.ceil(epochs * n_examples / per_step))


def fit(model, method, examples, *, lr, epochs, batch_size, grad_accum=1, warmup=0.05, seed=0, pad_id=0,
        device="cpu", bf16=False, fwd=None, desc="training", ckpt=None, resume=None, probe=None, timings=None,
        monitor=None):
    """Optimise the model's trainable parameters on `examples` with `method`; returns [(step, loss)], every 10 steps.

    probe: tokenized examples (a fixed sample of the safety memory) whose mean NLL is measured, without
    gradients, with each recorded loss: the entries are then (step, loss, probe's loss); the loss
    the aligned model's own safety data has as training goes on, the same in every method's run.
    fwd: the module that runs forward passes (DDP's wrapper under torchrun; default the model).
    ckpt: a checkpoint.Checkpoints, asked once per step whether to write one (every N steps, after
    the last, on SIGTERM / Ctrl-C / --stop-after). resume: (manifest, tensors) of its checkpoint, to go
    on after its step. The data order is not stored: it is regenerated from the seed.
    monitor: (every, fn, points): fn(step) measures the model (train.py: ASR on a fixed subset of the harmful
    prompts) before the first step, after every `every` steps and after the last; (step, value) goes to points,
    which checkpoints keep. timings: a dict that gets the first step's seconds (compilation happens there) and the mean of the others' (None: no others).
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device, fwd = torch.device(device), fwd or model
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=cuda, foreach=not cuda)
    rng = random.Random(seed)
    per_step = batch_size * grad_accum * world
    total = n_steps(len(examples), epochs, per_step)
    order = []
    while len(order) < total * per_step:  # whole shuffled epochs, cut at the last step
        order += grouped_order(examples, per_step, rng)
    first, losses = 0, []
    if resume:
        meta, tensors = resume
        first, losses = meta["step"], [tuple(x) for x in meta["losses"]]
        if first > total:  # a manifest edited or from other flags: the run would "finish" without training
            raise ValueError(f"--resume: the checkpoint is at step {first} of {desc}, which has {total} steps")
        load_optimizer(opt, meta["optimizer"], tensors)
        if monitor:
            monitor[2][:] = [tuple(p) for p in meta.get("curve", [])]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    model.train()
    measuring = [0.0]  # seconds spent in monitor after the first step, left out of the step time

    def measure(step):
        t = time.perf_counter()
        monitor[2].append((step, monitor[1](step)))
        model.train()
        measuring[0] += (time.perf_counter() - t) if step > first else 0.0

    if monitor and first == 0:
        measure(0)
    t0 = t1 = time.perf_counter()
    with ckpt or nullcontext():  # Ctrl-C and SIGTERM now ask for a checkpoint at the end of the step
        for step in (bar := tqdm(range(first, total), desc=desc, initial=first, total=total, disable=rank > 0)):
            step_lr = lr_at(step, total, lr, warmup)
            for g in opt.param_groups:
                g["lr"] = step_lr
            lr_scale = step_lr / lr if lr > 0 else 1.0  # the schedule, as a share of the peak (for a method)
            chosen = [examples[i] for i in order[step * per_step: (step + 1) * per_step]]
            tokens = max(1, sum(map(n_targets, chosen)))  # target tokens in the whole step, every process's
            batches = [collate(chosen[k: k + batch_size], pad_id, device)  # this process's micro-batches
                       for k in ((m * world + rank) * batch_size for m in range(grad_accum))]
            with autocast:
                method.begin_step(model, step, batches, total, lr_scale)
            step_loss = 0.0
            for m, batch in enumerate(batches):
                with autocast:
                    loss = method.loss(fwd, batch) * (len(batch["tgt"]) * world / tokens)  # its share of the step's tokens
                    if m == grad_accum - 1 and (term := method.step_loss(fwd)) is not None:
                        loss = loss + term  # a term of the whole step counts once
                loss.backward()
                step_loss += loss.detach()
            method.after_backward(model)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            method.after_step(model)
            opt.zero_grad(set_to_none=True)
            done = step + 1
            save = ckpt is not None and ckpt.due(done, total)
            record = step % 10 == 0 or done == total  # reading the loss waits for the device: not every step
            if record or save:
                if world > 1:  # the mean over processes: each one's loss counts its share of the tokens `world` times
                    step_loss = torch.as_tensor(step_loss, device=device).clone()
                    dist.all_reduce(step_loss)
                    step_loss /= world
                value = float(step_loss)
                if not math.isfinite(value) or (save and not all(bool(p.isfinite().all()) for p in params)):
                    kept = f"; the last good checkpoint, {ckpt.last}, is kept" if ckpt and ckpt.last else ""
                    raise ValueError(f"non-finite loss ({value}) at step {done}/{total} of {desc}: lower --lr or check the data{kept}")
                if record:
                    losses.append((step, value) if probe is None else (step, value, probe_loss(model, probe, device)))
                    bar.set_postfix(loss=f"{value:.3f}")
            if step == first:  # recorded: the loss was read, so the device has finished the step
                t1 = time.perf_counter()
            if monitor and (done % monitor[0] == 0 or done == total):
                measure(done)
            if save:  # then raises Stopped if asked to stop
                ckpt.save(done, total, desc, model, method, opt, losses, monitor[2] if monitor else None)
    if timings is not None:  # the last step was recorded too
        rest = total - first - 1
        timings.update(first_step_s=round(t1 - t0, 3), step_s=round((time.perf_counter() - t1 - measuring[0]) / rest, 3) if rest else None)
    model.eval()
    return losses


@torch.no_grad()
def probe_loss(model, examples, device, size=8):
    """Mean NLL over the examples' target tokens, in eval mode (no dropout: the run's random draws stay as they were)."""
    model.eval()
    chunks = [examples[k: k + size] for k in range(0, len(examples), size)]
    total = sum(float(nll(model, collate(c, device=device))) * sum(map(n_targets, c)) for c in chunks)
    model.train()
    return total / max(1, sum(map(n_targets, examples)))
