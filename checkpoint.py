"""Checkpoints of a training run (train.py --ckpt-every, --resume, SIGTERM): safetensors + JSON, no pickle.

OUT/ckpt holds one checkpoint. state-TASK-STEP.safetensors has the tensors: the trainable (LoRA) weights,
torch's RNG states and the method's tensors, now ("now.") and as the task began ("start.": on --resume,
begin_task and data run again from there), and the optimizer's state. manifest.json has the rest: task,
step, losses, the finished tasks' results, the Python RNG states, the optimizer's settings, the config.
It is written last and names the tensor file, so a run killed while writing keeps its previous
checkpoint whole. On a CPU a resumed run ends bitwise equal to an uninterrupted one (tests/test_resume.py).
"""
import os

import torch

from model import read_json, write_json

# flags a resumed run may change; every other one must equal the stopped run's
RESUME_MAY_CHANGE = {"resume", "ckpt_every", "stop_after", "overwrite", "device", "compile", "eval_batch_size", "grad_ckpt", "save"}


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
