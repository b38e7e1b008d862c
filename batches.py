"""Examples to batches, the one home of it: tokenize, order by length, pad into a batch, find the targets.

An example is {"ids", "labels"}: token ids and the same ids with -100 outside the assistant's answer
(tokenizer.encode_example), so the loss counts the response only. A batch is a dict of tensors:
idx (B, T) right-padded ids, labels (B, T), tgt_pos (N,) the flat positions of (B, T-1) that predict a
target token and tgt (N,) those targets, found on the host so that selecting them never waits for the
device. train.py, align.py, the methods and bench.py all batch through here.
"""
import torch


def tokenize(tok, examples, max_len, where):
    """{prompt, response} examples -> {ids, labels}; the loss counts the response tokens only."""
    out = []
    for i, e in enumerate(examples):
        ids, labels = tok.encode_example([{"role": "user", "content": e["prompt"]}, {"role": "assistant", "content": e["response"]}])
        if sum(l == -100 for l in labels) >= max_len:
            raise ValueError(f"{where}: example {i + 1}: the prompt alone is longer than --max-len {max_len}")
        out.append({"ids": ids[:max_len], "labels": labels[:max_len]})
    return out


def n_targets(example):
    """The tokens an example's loss counts: labels[1:] not -100 (position t predicts token t+1)."""
    return sum(l != -100 for l in example["labels"][1:])


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


def collate(examples, pad_id=0, device=None):
    """Right-pad (ids, labels) pairs into a batch dict (module docstring)."""
    T = max(len(e["ids"]) for e in examples)
    idx = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        idx[i, : len(e["ids"])] = torch.tensor(e["ids"])
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    tgt_pos = (labels[:, 1:] != -100).flatten().nonzero().squeeze(1)  # flat positions into (B, T-1)
    tgt = labels[:, 1:].flatten()[tgt_pos]
    return dict(idx=idx.to(device), labels=labels.to(device), tgt_pos=tgt_pos.to(device), tgt=tgt.to(device))


def at_targets(x, batch):
    """The rows of x (B, T, ...) at the positions that predict a target token: (N, ...).

    Position t predicts token t+1. The positions were found on the host by collate, so selecting them
    does not wait for the device (boolean-mask indexing would: its output size is data-dependent).
    """
    return x[:, :-1].flatten(0, 1).index_select(0, batch["tgt_pos"])
