"""bench.py runs both sides on the same weights and batches: the logits and the greedy tokens agree."""
import bench


def test_bench_compares_like_with_like(tiny_checkpoint, tmp_path):
    res = bench.main(["--model", str(tiny_checkpoint), "--device", "cpu", "--steps", "1", "--warmup", "1",
                      "--batch-size", "2", "--seq-len", "16", "--gen-batch", "3", "--prompt-len", "5",
                      "--new-tokens", "6", "--json", str(tmp_path / "b.json")])
    assert res["max_abs_logit_gap"] < 1e-4
    assert res["generate_same_tokens"] == 1.0  # fp32, greedy: the same continuation token for token
    for side in ("train_ours", "train_hf", "generate_ours", "generate_hf"):
        assert res[side]["tokens_per_s"] > 0
    assert (tmp_path / "b.json").exists()
