"""Checkpoints of a training run (train.py --ckpt-every, --resume, SIGTERM): safetensors + JSON, no pickle.

Checkpoints is what the loop (loop.fit) calls once per step: it catches Ctrl-C and SIGTERM, decides
when a checkpoint is due, writes it and stops the run after it when asked to. check_resume says
whether a stopped run may go on with the flags and data it is given.

OUT/ckpt holds one checkpoint. state-TASK-STEP.safetensors has the tensors: the trainable (LoRA) weights,
torch's RNG states and the method's tensors, now ("now.") and as the task began ("start.": on --resume,
begin_task and data run again from there), and the optimizer's state. manifest.json has the rest: task,
step, losses, the finished tasks' results, the Python RNG states, the optimizer's settings, the config.
It is written last and names the tensor file, so a run killed while writing keeps its previous
checkpoint whole. On a CPU a resumed run ends bitwise equal to an uninterrupted one (tests/test_resume.py).
"""
import signal
import threading
import time

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from files import read_json, save_tensors, write_json

# flags a resumed run may change; every other one must equal the stopped run's
RESUME_MAY_CHANGE = {"resume", "ckpt_every", "stop_after", "overwrite", "device", "compile", "eval_batch_size", "grad_ckpt", "save"}


class Stopped(Exception):
    """SIGTERM, Ctrl-C or --stop-after stopped the run after writing a checkpoint."""


class Checkpoints:
    """OUT/ckpt of a run, for the loop: due(done, total) and save(...) once per step, inside `with`.

    A checkpoint is written every `every` optimizer steps, after a task's last step, and after the step
    in which SIGTERM, Ctrl-C or --stop-after (`stop_after` steps of the whole run) asked the run to
    stop; Stopped is raised after that one. A second Ctrl-C (2 s or more after the first) stops at once,
    without a checkpoint. The
    run-level part of the manifest (which task, the finished tasks' results, the config) is what
    train.py passes to the constructor and to begin_task.
    """

    def __init__(self, path, every, stop_after=None, rank=0, device="cpu", **run):
        self.path, self.every, self.stop_after, self.rank, self.device = path, every, stop_after, rank, device
        self.run = run  # config, data_hashes
        self.stop, self.last, self.handlers = [], None, {}

    def begin_task(self, task, start, history, steps_before, train_seconds):
        """A task begins: `start` = snapshot(model, method, "start.") as it began; the rest goes into the manifest."""
        self.task, self.start, self.t0 = task, start, time.time()
        self.run.update(history=history, steps_before=steps_before, train_seconds=train_seconds)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            self.handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self.handlers.items():
            signal.signal(s, h)
        self.handlers = {}

    def on_signal(self, signum, frame):
        # asked twice: stop now, without a checkpoint; but not for one signal delivered twice at once (a cluster
        # signals every process of a job, and the sweep passes its own signal on to train.py too)
        if self.stop and time.time() - self.stopped_at > 2:
            raise KeyboardInterrupt
        if not self.stop:
            self.stop.append(signal.Signals(signum).name)
            self.stopped_at = time.time()

    def due(self, done, total):
        """Is a checkpoint due after step `done` of the task's `total`?"""
        if self.stop_after is not None and self.run["steps_before"] + done >= self.stop_after and not self.stop:
            self.stop.append("--stop-after")
        if dist.is_initialized():  # every process stops after the same step (a signal may reach them at different steps)
            flag = torch.tensor([float(bool(self.stop))], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not self.stop:
                self.stop.append("a signal to another process")
        return done % self.every == 0 or done == total or bool(self.stop)

    def save(self, done, total, desc, model, method, opt, losses, curve=None):
        """Write the checkpoint after step `done` (rank 0); then raise Stopped if the run was asked to stop."""
        if self.rank == 0:
            tensors, method_state = snapshot(model, method, "now.")
            opt_tensors, opt_state = optimizer_state(opt)
            start_tensors, start_state = self.start
            write_checkpoint(self.path, {**tensors, **opt_tensors, **start_tensors}, dict(
                self.run, task=self.task, step=done, losses=losses, method=method_state, start=start_state,
                **({"curve": curve} if curve is not None else {}),
                optimizer=opt_state, train_seconds=self.run["train_seconds"] + time.time() - self.t0))
        self.last = f"{self.path} (step {done})"
        if self.stop:
            raise Stopped(f"stopped by {self.stop[0]} after step {done}/{total} of {desc}; checkpoint {self.last}: "
                          "run the same command with --resume to continue")


def check_resume(saved, config, data_hashes, changes_frozen_weights, path):
    """A stopped run goes on only with the flags (but RESUME_MAY_CHANGE) and the data files it had."""
    was = saved["config"]
    if diff := sorted(k for k in config.keys() | was.keys() if config.get(k) != was.get(k)):
        k = diff[0]
        raise ValueError(f"--resume: the stopped run had --{k.replace('_', '-')} {was.get(k)!r}, this one "
                         f"{config.get(k)!r}; resume with the same flags")
    if saved["data_hashes"] != data_hashes:
        raise ValueError(f"--resume: the data files changed since the checkpoint in {path}; start over with --overwrite")
    if saved["task"] > 0 and changes_frozen_weights:
        raise ValueError(f"--resume: --method {config['method']} changed the frozen weights at the end of a task, which "
                         "a checkpoint does not hold; its runs resume only in their first task")


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
    want = [f"{prefix}param.{n}" for n, p in model.named_parameters() if p.requires_grad] + [f"{prefix}rng.cpu"]
    if missing := [k for k in want if k not in tensors]:
        raise ValueError(f"--resume: the checkpoint's tensors lack {missing[0]!r} ({len(missing)} missing): "
                         "not a checkpoint of this run's model and LoRA")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                if tensors[f"{prefix}param.{n}"].shape != p.shape:
                    raise ValueError(f"--resume: the checkpoint's {prefix}param.{n} has shape "
                                     f"{tuple(tensors[f'{prefix}param.{n}'].shape)}, the model's is {tuple(p.shape)}")
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
    name = f"state-{meta['task']}-{meta['step']}.safetensors"
    path.mkdir(parents=True, exist_ok=True)
    save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path / name)
    write_json(path / "manifest.json", {**meta, "tensors": name})
    for f in path.iterdir():
        if f.name != name and (f.name.startswith("state-") or f.name.endswith(".tmp")):
            f.unlink()


def read_checkpoint(path):
    """(manifest, tensors) of the checkpoint in path."""
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(f"--resume: no checkpoint to resume from in {path} (no manifest.json)")
    meta = read_json(path / "manifest.json")
    kinds = dict(task=int, step=int, losses=list, history=list, steps_before=int, train_seconds=(int, float), method=dict,
                 start=dict, optimizer=dict, config=dict, data_hashes=dict, tensors=str)  # what Checkpoints.save writes
    if not isinstance(meta, dict) or (missing := kinds.keys() - meta.keys()):
        raise ValueError(f"{path / 'manifest.json'}: not a checkpoint of this train.py (no {sorted(missing)[0]!r})"
                         if isinstance(meta, dict) else f"{path / 'manifest.json'}: not a JSON object")
    for k, kind in kinds.items():
        if not isinstance(meta[k], kind) or isinstance(meta[k], bool) or (kind is int and meta[k] < 0):
            raise ValueError(f"{path / 'manifest.json'}: field {k!r} is {meta[k]!r}, not what train.py writes there")
    f = path / meta["tensors"]
    if f.parent != path:
        raise ValueError(f"{path / 'manifest.json'}: field 'tensors' must name a file in {path}")
    try:
        return meta, load_file(str(f))
    except Exception as e:  # missing, truncated, not safetensors: safetensors raises its own types
        raise ValueError(f"{f}: cannot read the checkpoint ({e})") from None
