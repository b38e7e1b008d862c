"""LoRA: zero delta at init, merge == unmerged, idempotent merge, only LoRA trains, PEFT layout."""

import pytest
import torch

import lora
from conftest import tiny_model as tiny
from model import Transformer


def randomise_B(model):
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.normal_(0, 0.1)


IDX = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def test_zero_delta_at_init_and_disabled_is_base():
    m = tiny()
    with torch.no_grad():
        base = m(IDX)
        lora.apply_lora(m, rank=4, alpha=8)
        assert torch.equal(m(IDX), base)
        randomise_B(m)
        assert not torch.allclose(m(IDX), base)
        with lora.disabled(m):
            assert torch.equal(m(IDX), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_for_a_while_gives_the_same_outputs_and_the_exact_weights_back(dtype):
    """lora.merged (the evaluation's fast path): outputs as unmerged, to the dtype's rounding; afterwards every weight
    bit for bit as before, even in bf16 where merge then unmerge would not give them back."""
    m = lora.apply_lora(tiny().to(dtype), rank=4, alpha=8, targets=("q_proj", "v_proj"))
    randomise_B(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        y = m(IDX).float()
        with lora.merged(m):
            assert m.model.layers[0].self_attn.q_proj.merged
            y_merged = m(IDX).float()
    assert torch.allclose(y_merged, y, atol=1e-5 if dtype == torch.float32 else 0.1)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert not m.model.layers[0].self_attn.q_proj.merged
    if dtype == torch.bfloat16:  # the reason for the copy: a round trip in bf16 changes the weights
        lora.merge(m)
        lora.unmerge(m)
        assert not torch.equal(m.model.layers[0].self_attn.q_proj.weight, before["model.layers.0.self_attn.q_proj.weight"])


def test_merge_equals_unmerged_and_is_idempotent():
    m = lora.apply_lora(tiny(), rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    randomise_B(m)
    w0 = m.model.layers[0].self_attn.q_proj.weight.clone()
    with torch.no_grad():
        y = m(IDX)
        lora.merge(m)
        w1 = m.model.layers[0].self_attn.q_proj.weight.clone()
        lora.merge(m)  # second merge is a no-op
        assert torch.equal(m.model.layers[0].self_attn.q_proj.weight, w1)
        assert torch.allclose(m(IDX), y, atol=1e-5)
        with lora.disabled(m):  # disabled still means the base model while merged
            with lora.disabled(tiny()) as base:
                assert torch.allclose(m(IDX), base(IDX), atol=1e-5)
        lora.unmerge(m)
        lora.unmerge(m)
        assert torch.allclose(m.model.layers[0].self_attn.q_proj.weight, w0, atol=1e-6)
        assert torch.allclose(m(IDX), y, atol=1e-5)


def test_only_lora_parameters_get_gradients():
    m = lora.apply_lora(tiny(), rank=4, alpha=8)
    m.train()
    m(IDX).sum().backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(p.grad is None for n, p in m.named_parameters() if "lora_" not in n)
    # B is zero at init, so A gets no gradient but B does
    assert all(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "lora_B" in n)


def test_no_matching_target_is_an_error():
    with pytest.raises(ValueError, match="no linear layer"):
        lora.apply_lora(tiny(), targets=("c_attn",))


def test_save_and_load_adapter_round_trip(tmp_path):
    m = lora.apply_lora(tiny(), rank=4, alpha=8, targets=("q_proj", "k_proj", "o_proj"))
    randomise_B(m)
    lora.save_adapter(m, tmp_path / "ad")
    m2 = lora.load_adapter(tiny(), tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(m(IDX), m2(IDX))


def test_adapter_loads_in_peft_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    hf.save_pretrained(tmp_path / "base")
    ours = lora.apply_lora(Transformer.from_pretrained(tmp_path / "base"), rank=4, alpha=16, targets=("q_proj", "v_proj", "up_proj"))
    randomise_B(ours)
    lora.save_adapter(ours, tmp_path / "ad", base_model_name_or_path=str(tmp_path / "base"))
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    with torch.no_grad():
        assert (ours(IDX) - theirs(IDX).logits).abs().max() <= 1e-5
    # and back: an adapter written by PEFT loads into ours
    theirs.save_pretrained(tmp_path / "peft_ad")
    back = lora.load_adapter(Transformer.from_pretrained(tmp_path / "base"), tmp_path / "peft_ad")
    with torch.no_grad():
        assert (back(IDX) - ours(IDX)).abs().max() <= 1e-6


def test_mismatched_adapter_is_an_error(tmp_path):
    m = lora.apply_lora(tiny(), rank=4, alpha=8)
    lora.save_adapter(m, tmp_path / "ad")
    other = lora.apply_lora(tiny(), rank=4, alpha=8, targets=("q_proj",))
    with pytest.raises(ValueError, match="does not match"):
        lora.load_adapter(other, tmp_path / "ad")
