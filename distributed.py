"""Several processes under torchrun: DDP (a copy of the model per GPU) or FSDP2 (`--fsdp`, shards).

train.py uses these; each process takes its share of every step (loop.py says how the loss is
normalised so that N processes compute the step one process would).
"""
import datetime
import os

import torch
import torch.distributed as dist


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def setup_distributed(args):
    """Under torchrun (WORLD_SIZE > 1): join the process group, one GPU per process. Returns the rank."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return 0
    cuda = args.device.startswith("cuda")
    if cuda:
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    # rank 0 alone aligns, evaluates and writes while the others wait: allow it hours, not the default minutes
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=6))
    return dist.get_rank()


def shard(model, args):
    """FSDP2: each block's weights, then the rest, sharded over the processes; gathered per block when used."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    cuda = args.device.startswith("cuda")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else MixedPrecisionPolicy()
    mesh = init_device_mesh("cuda" if cuda else "cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.inv_freq = model.inv_freq.to(args.device)  # a buffer: not sharded, not moved


class DDP(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that passes attribute reads (lm_head, config) through to the model, as methods expect."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)
