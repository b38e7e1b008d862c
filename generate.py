"""Batched generation with a preallocated KV cache: greedy or sampled (temperature, top-p).

Ragged prompts are left-padded to a common length and prefilled in one forward pass; each row gets
its own RoPE positions (pads do not count) and a key mask hides the pads, so a prompt gives the same
tokens alone or in a batch. Rows stop at any of `stop_ids`; the loop ends when every row has.
"""
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


@torch.no_grad()
def generate(model, prompts, max_new_tokens=128, stop_ids=(), temperature=0.0, top_p=1.0, pad_id=0,
             generator=None, decode_step=None):
    """Continue each prompt (a list of token id lists); returns the new ids of each, stop token excluded.

    decode_step: a compiled `model` for the one-token steps (e.g. torch.compile(model, mode="reduce-overhead")).
    Its KV caches are then kept for the next call of the same shape; model.clear_cache() frees them.
    """
    device = model.lm_head.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    max_ctx = model.config.max_seq_len
    if P + max_new_tokens > max_ctx:
        raise ValueError(f"prompt of {P} tokens + {max_new_tokens} new tokens exceeds the model's context ({max_ctx})")
    L = min(max_ctx, -(-(P + max_new_tokens) // 64) * 64)  # cache length rounded up: batches share shapes
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
        h = model(idx, positions=positions, input_pos=torch.arange(P, device=device), key_mask=filled(P), return_hidden=True)
        # the prompt's other positions need no logits; 2-D, so it is one matrix product: the 3-D slice h[:, -1:] of
        # frozen weights went through a batched product that copied the vocabulary matrix per row (5 s a batch)
        logits = model.lm_head(h[:, -1])[:, None]
        pos = positions[:, -1:]  # (B, 1)
        stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out = []
        for t in range(max_new_tokens):
            tok = sample(logits[:, -1], temperature, top_p, generator)  # (B,)
            done = done | torch.isin(tok, stops)
            out.append(torch.where(done, -1, tok))
            if t + 1 == max_new_tokens or (stop_ids and bool(done.all())):  # the check waits for the device
                break
            pos = pos + 1
            key_mask[:, P + t] = True
            logits = step(tok[:, None], positions=pos, input_pos=torch.tensor([P + t], device=device),
                          key_mask=filled(P + t + 1))
    finally:
        model.clear_cache(keep=decode_step is not None)
    out = torch.stack(out, 1).tolist()  # (B, new)
    return [[t for t in row[: row.index(-1) if -1 in row else len(row)]] for row in out]


def complete(model, tok, ids, max_new_tokens, batch_size, desc, decode_step=None):
    """Greedy continuations (text) of token id lists, in their order (batched longest-first: less padding)."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = [None] * len(ids)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=not ids):
        chunk = order[s: s + batch_size]
        for i, new in zip(chunk, generate(model, [ids[i] for i in chunk], max_new_tokens, tok.stop_ids, pad_id=tok.pad_id,
                                            decode_step=decode_step)):
            out[i] = tok.decode(new).strip()
    return out
