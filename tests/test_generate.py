"""Generation: the KV cache changes nothing, batching changes nothing, sampling is reproducible."""
import pytest
import torch

from conftest import tiny_model
from generate import generate


def tiny(**kw):
    return tiny_model(sharp=True, **kw)  # greedy choices are not near-ties


def greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# the default tiny Llama; Mistral's window (4 < the prompts + 12 new tokens) in every layer; and Gemma 2/3's set:
# alternating sliding and global layers with their own RoPE bases, q/k norms, sandwich norms, soft-capped scores
VARIANTS = {"llama": {}, "sliding": dict(sliding_window=4),
            "gemma-2-3": dict(sliding_window=4, layer_types=("sliding_attention", "full_attention"), local_rope_theta=100.0,
                              gemma=True, qk_norm=True, sandwich_norm=True, attn_scale=0.3, attn_softcap=2.0,
                              final_softcap=5.0)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_equals_no_cache_and_batch_equals_single(variant):
    m = tiny(**VARIANTS[variant])
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [5, 5, 5, 1]]
    batched = generate(m, prompts, max_new_tokens=12)
    for p, got in zip(prompts, batched):
        assert got == greedy_without_cache(m, p, 12)
        assert generate(m, [p], max_new_tokens=12)[0] == got


@pytest.mark.parametrize("variant", VARIANTS)
def test_reading_the_filled_slots_equals_reading_the_whole_cache(variant):
    # eager steps attend to the filled cache slots only; a decode_step (compiled in use) to all of them
    m = tiny(**VARIANTS[variant])
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [5, 5, 5, 1]]
    m.setup_cache(3, 64)
    with torch.no_grad():
        idx = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [0] * 5 + [9, 8], [0] * 3 + [5, 5, 5, 1]])
        key_mask = torch.zeros(3, 64, dtype=torch.bool)
        key_mask[0, :7], key_mask[1, 5:7], key_mask[2, 3:7] = True, True, True
        pos = (key_mask[:, :7].long().cumsum(-1) - 1).clamp(min=0)
        whole = m(idx, positions=pos, input_pos=torch.arange(7), key_mask=key_mask)
        filled = m(idx, positions=pos, input_pos=torch.arange(7), key_mask=key_mask[:, :7])
    m.clear_cache()
    torch.testing.assert_close(filled, whole)
    assert generate(m, prompts, max_new_tokens=12, decode_step=m) == generate(m, prompts, max_new_tokens=12)


def test_stop_ids_end_rows_and_are_excluded():
    m = tiny()
    p = [1, 2, 3]
    full = generate(m, [p], max_new_tokens=10)[0]
    stop = full[4]
    got = generate(m, [p, [4, 4]], max_new_tokens=10, stop_ids={stop})[0]
    assert got == full[: full.index(stop)]


def test_sampling_is_seeded_and_top_p_small_is_greedy():
    m = tiny(gemma=False)
    g = lambda s: torch.Generator().manual_seed(s)
    a = generate(m, [[1, 2]], 10, temperature=1.0, generator=g(0))
    assert a == generate(m, [[1, 2]], 10, temperature=1.0, generator=g(0))
    assert generate(m, [[1, 2]], 10, temperature=1.0, top_p=1e-6, generator=g(1)) == generate(m, [[1, 2]], 10)


def test_too_long_prompt_is_an_error():
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(tiny(), [[1] * 120], max_new_tokens=10)


def test_going_on_moves_the_fewest_rows_and_keeps_min_rows(monkeypatch):
    import generate as g
    monkeypatch.setattr(g, "MIN_ROWS", 2)
    done = torch.tensor([True, False, True, False, False])
    assert g.going_on(done).tolist() == [3, 1, 4]  # rows 0 and 2 stopped: rows 3 and 4 take their places
    assert g.going_on(torch.tensor([False, True, True, False])).tolist() == [0, 3]
    assert g.going_on(torch.tensor([True, True, False])).tolist() == [0, 2]  # one row left keeps a stopped companion
    monkeypatch.setattr(g, "MIN_ROWS", 3)
    assert g.going_on(torch.tensor([True, True, True, False, True])).tolist() == [0, 1, 3]


@pytest.mark.parametrize("variant", VARIANTS)
def test_stopped_rows_leave_the_batch_and_change_no_answer(variant):
    # eager generation drops stopped rows (and their cache rows) down to MIN_ROWS; a decode_step keeps every row to the end
    m = tiny(**VARIANTS[variant])
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 64, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (40,), generator=g)]
    free = generate(m, prompts, max_new_tokens=12)
    # the stop token that ends the most rows at different steps, with at least one row running on
    ends = lambda s: [row.index(s) if s in row else None for row in free]
    stop = max({t for row in free for t in row}, key=lambda s: (None in ends(s), len(set(ends(s)) - {None})))
    assert None in ends(stop) and len(set(ends(stop)) - {None}) >= 2
    kept, keep = [], m.keep_cache_rows
    m.keep_cache_rows = lambda rows, filled: (kept.append(rows.tolist()), keep(rows, filled))
    got = generate(m, prompts, max_new_tokens=12, stop_ids={stop})
    assert any(r != list(range(len(r))) for r in kept) and all(len(r) >= 16 for r in kept)  # rows moved, 16 at least
    assert got == [row[: row.index(stop)] if stop in row else row for row in free]
    assert got == generate(m, prompts, max_new_tokens=12, stop_ids={stop}, decode_step=m)


def test_prefill_runs_pad_least():
    from generate import prefill_runs
    assert prefill_runs([10, 9, 3, 3, 2], 0) == [(0, 1), (1, 2), (2, 4), (4, 5)]  # free passes: no padding at all
    assert prefill_runs([10, 9, 3, 3, 2], 4) == [(0, 2), (2, 5)]  # 20 + 9 + 2 passes: 37 (one pass: 54; three: 40)
    assert prefill_runs([10, 9, 3, 3, 2], 100) == [(0, 5)]
    assert prefill_runs([5], 0) == [(0, 1)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_in_runs_changes_no_answer(variant, monkeypatch):
    # on a CPU prompts are prefilled in runs of similar lengths, each into its rows of the caches from its own first slot
    import generate as g
    m = tiny(**VARIANTS[variant])
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 64, (int(n),), generator=gen).tolist() for n in torch.randint(1, 13, (20,), generator=gen)]
    monkeypatch.setattr(g, "PREFILL_PASS_TOKENS", 10**9)
    one_pass = generate(m, prompts, max_new_tokens=12)
    passes, cache_rows = [], m.cache_rows
    m.cache_rows = lambda a, b: (passes.append((a, b)), cache_rows(a, b))[1]
    monkeypatch.setattr(g, "PREFILL_PASS_TOKENS", 0)  # a run per prompt length
    assert generate(m, prompts, max_new_tokens=12) == one_pass
    assert len(passes) == len({len(p) for p in prompts}) > 5
    assert generate(m, prompts, max_new_tokens=12, decode_step=m) == one_pass
    for p, got in list(zip(prompts, one_pass))[:4]:
        assert got == greedy_without_cache(m, p, 12)
