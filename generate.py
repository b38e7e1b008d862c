"""Batched generation with a preallocated KV cache: greedy or sampled (temperature, top-p).

Ragged prompts are left-padded to a common length, so that every row's next token goes to the same cache slot; on a
CPU they are prefilled a run of similar lengths at a time, each run padded only to its own longest prompt (see
prefill_runs). Each row gets its own RoPE positions (pads do not count) and a key mask hides the pads and the slots
left empty, so a prompt gives the same tokens alone or in a batch (up to rounding: on a CPU in bf16, SDPA's kernel on
2 threads gave 11 of 36,480 rows' attention outputs of one evaluation batch a last bit other than the row alone,
2026-12-05, Zen 5). Rows stop at any of `stop_ids`; in eager steps stopped rows leave the batch (their cache rows too;
see going_on), so that the answers still running do not carry them; the loop ends when every row has stopped.
"""
import math

import torch
from tqdm import tqdm


def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """Next token ids (B,) from logits (B, vocab)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# What a prefill forward pass costs beyond its tokens, in prompt tokens: about 30 ms against 1.3-1.5 ms a token in fp32,
# 15-20 ms against 0.40-0.45 in bf16 (the default model, a 2-core Zen 5, 2026-12-06). On a GPU, unmeasured there, the
# prefill stays one pass.
PREFILL_PASS_TOKENS = 32


def prefill_runs(lengths, pass_tokens):
    """Runs [a, b) of prompt lengths sorted longest first, each to be prefilled in one pass padded to its first length:
    the runs of the least padded tokens plus pass_tokens a pass. The first batch of bench.py's 128 evaluation prompts
    (64 of them, 131 tokens down to 37) is 52% padding in one pass; in runs its prefill took 5.6 s instead of 13.1.
    Runs change no fp32 answer of those 128 (first-token logits within 5e-5); in bf16 18 of 128 differ, near-ties of
    the kind that moving a prompt between batches flips too (10 of 32 differed alone and in their batch in one pass)."""
    best, start = [0] + [math.inf] * len(lengths), [0] * (len(lengths) + 1)  # best[b]: the cost of rows :b
    for b in range(1, len(lengths) + 1):
        for a in range(b):
            cost = best[a] + pass_tokens + (b - a) * lengths[a]
            if cost < best[b]:
                best[b], start[b] = cost, a
    runs, b = [], len(lengths)
    while b:
        runs.append((start[b], b))
        b = start[b]
    return runs[::-1]


MIN_ROWS = 16  # a batch shrinks no further: see going_on


def going_on(done):
    """The rows that go on after some stopped, as indices into the batch (new row i is old row rows[i]): each
    stopped row among the first n (n: the rows kept) takes the place of a row going on from beyond n, so that as
    few rows move as possible. At least MIN_ROWS rows (or all) are kept, stopped ones among them: in fp32 the BLAS
    runs products of 1-3, 5-7 or 9-11 rows with other kernels, which round differently (measured on a Zen 5,
    2026-12-05; from 12 rows on, a row's result does not depend on the others), so a row's tokens would depend on
    how many rows are left. The floor costs little: a decode step of 16 rows took 81 ms against 61 for 4 (64 rows:
    228; fp32, the default model, 100-token prompts)."""
    keep = ~done
    short = min(MIN_ROWS, len(done)) - int(keep.sum())
    if short > 0:
        keep[done.nonzero()[:short, 0]] = True  # stopped companions; they stay stopped
    n = int(keep.sum())
    rows = torch.arange(n, device=done.device)
    rows[~keep[:n]] = keep[n:].nonzero()[:, 0] + n
    return rows


@torch.no_grad()
def generate(model, prompts, max_new_tokens=128, stop_ids=(), temperature=0.0, top_p=1.0, pad_id=0,
             generator=None, decode_step=None, cache_len=None):
    """Continue each prompt (a list of token id lists); returns the new ids of each, stop token excluded.

    decode_step: a compiled `model` for the one-token steps (e.g. torch.compile(model, mode="reduce-overhead")).
    Its KV caches are then kept for the next call of the same shape; model.clear_cache() frees them.
    cache_len: the KV cache's slots (default: the prompts and new tokens, rounded up to 64).
    """
    device = model.lm_head.weight.device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: prefill runs are neighbours
    prompts = [prompts[i] for i in order]
    B, P = len(prompts), len(prompts[0])
    max_ctx = model.config.max_seq_len
    if P + max_new_tokens > max_ctx:
        raise ValueError(f"prompt of {P} tokens + {max_new_tokens} new tokens exceeds the model's context ({max_ctx})")
    L = min(max_ctx, cache_len or -(-(P + max_new_tokens) // 64) * 64)  # rounded up: batches share shapes
    if L < P + max_new_tokens:
        raise ValueError(f"cache_len {L} < prompt of {P} tokens + {max_new_tokens} new tokens")
    idx = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    key_mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):  # left padding: every row's last prompt token sits in slot P-1
        idx[i, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        key_mask[i, P - len(p):] = True
    positions = (key_mask[:, :P].long().cumsum(-1) - 1).clamp(min=0)  # (B, P)
    model.setup_cache(B, L)
    step = model if decode_step is None else decode_step
    try:
        # eager, each step reads only the filled slots (key_mask[:, :n]); a compiled step reads all L (static shapes)
        filled = (lambda n: key_mask) if decode_step is not None else (lambda n: key_mask[:, :n])
        # the prefill, a run at a time: a run's rows of the caches from its longest prompt's first slot on (the slots
        # before stay empty, masked)
        runs = prefill_runs([len(p) for p in prompts], PREFILL_PASS_TOKENS) if device.type == "cpu" else [(0, B)]
        h = []
        with torch.compiler.set_stance("force_eager"):  # compiled blocks would compile again for every prompt length
            for a, b in runs:
                s = P - len(prompts[a])
                with model.cache_rows(a, b):
                    h.append(model(idx[a:b, s:], positions=positions[a:b, s:], input_pos=torch.arange(s, P, device=device),
                                   key_mask=filled(P)[a:b], return_hidden=True)[:, -1])
        # the prompt's other positions need no logits; 2-D, so it is one matrix product: the 3-D slice h[:, -1:] of
        # frozen weights went through a batched product that copied the vocabulary matrix per row (5 s a batch)
        logits = model.lm_head(torch.cat(h))[:, None]
        pos = positions[:, -1:]  # (B, 1)
        stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        live = torch.tensor(order, device=device)  # the prompt of each row still in the batch (and in the caches)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=device)
        for t in range(max_new_tokens):
            tok = sample(logits[:, -1], temperature, top_p, generator)  # (rows,)
            done = done | torch.isin(tok, stops)
            out[live, t] = torch.where(done, -1, tok)
            stopped = int(done.sum()) if stop_ids else 0  # waits for the device
            if t + 1 == max_new_tokens or stopped == len(done):
                break
            if stopped and decode_step is None and len(done) > MIN_ROWS:  # eager: stopped rows leave the batch
                rows = going_on(done)
                model.keep_cache_rows(rows, P + t)
                live, tok, pos, key_mask, done = live[rows], tok[rows], pos[rows], key_mask[rows], done[rows]
            pos = pos + 1
            key_mask[:, P + t] = True
            logits = step(tok[:, None], positions=pos, input_pos=torch.tensor([P + t], device=device),
                          key_mask=filled(P + t + 1))
    finally:
        model.clear_cache(keep=decode_step is not None)
    out = out.tolist()  # (B, new)
    return [[t for t in row[: row.index(-1) if -1 in row else len(row)]] for row in out]


def complete(model, tok, ids, max_new_tokens, batch_size, desc, decode_step=None):
    """Greedy continuations (text) of token id lists, in their order (batched longest-first: less padding).

    With a compiled decode_step every batch has one shape, so that the step compiles (and records its CUDA graph)
    once per call rather than once per batch: batch_size rows (the last batch filled up with copies of its first
    prompt, whose answers are dropped) and a cache of a power of two slots for the longest prompt (eager steps
    read only the filled slots, so without a decode_step this changes nothing but the memory set aside).
    """
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = [None] * len(ids)
    cache_len = max(64, 1 << (max(map(len, ids), default=1) + max_new_tokens - 1).bit_length())
    for s in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=not ids):
        chunk = order[s: s + batch_size]
        rows = [ids[i] for i in chunk]
        if decode_step is not None:
            rows += rows[:1] * (batch_size - len(rows))
        for i, new in zip(chunk, generate(model, rows, max_new_tokens, tok.stop_ids, pad_id=tok.pad_id,
                                            decode_step=decode_step, cache_len=cache_len)):
            out[i] = tok.decode(new).strip()
    return out
