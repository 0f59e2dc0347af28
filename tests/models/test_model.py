"""Model-level equivalences: packed vs separate documents, recurrent decode vs full forward, init, loss."""

from __future__ import annotations

import pytest
import torch

from metala import MetaLAConfig, MetaLAForCausalLM, next_token_labels
from tests.corpus import byte_tokens
from tests.utils import assert_close

FP32_RATIO = 2e-5


def tiny(**overrides) -> MetaLAForCausalLM:
    return MetaLAForCausalLM(MetaLAConfig.from_preset("tiny", **overrides), seed=0)


def with_trained_aug(model: MetaLAForCausalLM) -> MetaLAForCausalLM:
    # w_aug starts at 0 (the offset then cancels); give it values so the self-augmentation path is exercised
    with torch.no_grad():
        for layer in model.layers:
            layer.mixer.self_aug.w_aug.normal_(0, 0.5)
    return model


def test_packed_equals_separate_documents():
    model = with_trained_aug(tiny())
    lengths = [7, 1, 2, 30, 24]
    ids = torch.randint(0, 512, (1, sum(lengths)))
    labels = next_token_labels(ids)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    packed = model(ids, labels=labels, cu_seqlens=cu)
    packed_grads = torch.autograd.grad(packed.loss * packed.n_tokens, list(model.parameters()))
    sep_loss_sum = 0
    for n in range(len(lengths)):
        s, e = int(cu[n]), int(cu[n + 1])
        out = model(ids[:, s:e], labels=labels[:, s:e])
        assert_close(f"logits[{n}]", out.logits, packed.logits[:, s:e], FP32_RATIO)
        sep_loss_sum = sep_loss_sum + out.loss * out.n_tokens
    sep_grads = torch.autograd.grad(sep_loss_sum, list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), sep_grads, packed_grads):
        assert_close(name, a, b, FP32_RATIO)


def test_packed_batch_rows_flattened():
    # B > 1 with cu_seqlens over the flattened B * T tokens equals one row per document
    model = tiny()
    ids = torch.randint(0, 512, (2, 16))
    cu = torch.tensor([0, 16, 32])
    assert_close("logits", model(ids).logits, model(ids, cu_seqlens=cu).logits, FP32_RATIO)


def test_conv_resets_at_document_start():
    # without cu_seqlens the second document sees the first through the conv and the state
    model = tiny()
    ids = torch.randint(0, 512, (1, 20))
    cu = torch.tensor([0, 10, 20])
    alone = model(ids[:, 10:]).logits
    packed = model(ids, cu_seqlens=cu).logits[:, 10:]
    joined = model(ids).logits[:, 10:]
    assert_close("packed", alone, packed, FP32_RATIO)
    assert (alone - joined).abs().max() > 1e-3


def test_doc_reset_false_ignores_boundaries():
    model = tiny(doc_reset=False)
    ids = torch.randint(0, 512, (1, 20))
    assert torch.equal(model(ids, cu_seqlens=torch.tensor([0, 10, 20])).logits, model(ids).logits)


@pytest.mark.parametrize("prefill", [1, 2, 5, 33])
def test_recurrent_decode_equals_full_forward(prefill):
    model = with_trained_aug(tiny()).eval()
    ids = torch.randint(0, 512, (3, 48))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        parts = [model(ids[:, :prefill], cache=cache).logits]
        for t in range(prefill, ids.shape[1]):
            parts.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert cache.seen_tokens == ids.shape[1]
    assert_close("logits", full, torch.cat(parts, 1), FP32_RATIO)


def test_decode_cache_size_is_constant():
    model = tiny().eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 512, (1, 10)), cache=cache)
        size_10 = cache.nbytes()
        model(torch.randint(0, 512, (1, 300)), cache=cache)
    assert cache.nbytes() == size_10 > 0


def test_generate_greedy_matches_argmax_of_full_forward():
    model = tiny().eval()
    prompt = torch.randint(0, 512, (2, 9))
    out = model.generate(prompt, max_new_tokens=12)
    assert out.shape == (2, 21) and torch.equal(out[:, :9], prompt)
    with torch.no_grad():
        logits = model(out[:, :-1]).logits
    assert torch.equal(logits[:, 8:].argmax(-1), out[:, 9:])


def test_generate_left_padding_matches_unpadded():
    model = with_trained_aug(tiny()).eval()
    a = torch.randint(0, 512, (1, 12))
    b = torch.randint(0, 512, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)], 0)
    mask = torch.ones_like(batch)
    mask[1, :7] = 0
    out = model.generate(batch, max_new_tokens=8, attention_mask=mask)
    assert torch.equal(out[0, 12:], model.generate(a, max_new_tokens=8)[0, 12:])
    assert torch.equal(out[1, 12:], model.generate(b, max_new_tokens=8)[0, 5:])


def test_generate_stops_at_eos():
    model = tiny().eval()
    prompt = torch.randint(0, 512, (1, 4))
    first = model.generate(prompt, max_new_tokens=1)[0, -1].item()
    out = model.generate(prompt, max_new_tokens=10, eos_token_id=first)
    assert out.shape[1] == 5


def test_self_aug_offset_cancels_at_init():
    # w_aug = 0 adds sigmoid(0) = 0.5 to every channel; the mean-centring head norm removes it exactly
    on, off = tiny(self_aug=True), tiny(self_aug=False)
    off.load_state_dict({k: v for k, v in on.state_dict().items() if "w_aug" not in k})
    ids = torch.randint(0, 512, (2, 30))
    # equal up to fp32 rounding of (o + 0.5): o is small at init, so a few ulps of 0.5 are ~1e-5 of o
    assert_close("logits", on(ids).logits, off(ids).logits, 1e-4)


def test_chunked_loss_equals_plain_loss():
    model = tiny()
    ids = torch.randint(0, 512, (2, 40))
    labels = next_token_labels(ids)
    plain = model(ids, labels=labels)
    g_plain = torch.autograd.grad(plain.loss, list(model.parameters()))
    model.config.loss_chunk_size = 16
    chunked = model(ids, labels=labels)
    assert chunked.logits is None
    g_chunked = torch.autograd.grad(chunked.loss, list(model.parameters()))
    assert_close("loss", plain.loss, chunked.loss, 1e-6)
    for (name, _), a, b in zip(model.named_parameters(), g_plain, g_chunked):
        assert_close(name, a, b, 5e-5)  # fp32: the fused loss sums the chunks in another order


def test_meta_device_init_is_identical():
    cfg = MetaLAConfig.from_preset("tiny", tie_embeddings=False)
    direct = MetaLAForCausalLM(cfg, seed=3)
    with torch.device("meta"):
        meta = MetaLAForCausalLM(cfg)
    meta.to_empty(device="cpu")
    meta.init_weights(seed=3)
    for (name, a), (_, b) in zip(direct.state_dict().items(), meta.state_dict().items()):
        assert torch.equal(a, b), name
    other_seed = MetaLAForCausalLM(cfg, seed=4)
    assert not torch.equal(other_seed.embed.weight, direct.embed.weight)


def test_tied_embeddings_share_storage():
    model = tiny()
    assert model.lm_head.weight is model.embed.weight
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed.weight


def test_init_statistics_follow_neox_rule():
    cfg = MetaLAConfig.from_preset("tiny", d_model=256, n_heads=2, n_layers=4)
    model = MetaLAForCausalLM(cfg)
    small = (2 / (5 * 256)) ** 0.5
    wang = 2 / (4 * 256**0.5)
    mixer = model.layers[0].mixer
    assert abs(mixer.q_proj.weight.std().item() - small) / small < 0.05
    assert abs(mixer.o_proj.weight.std().item() - wang) / wang < 0.05
    assert abs(model.layers[1].mlp.down_proj.weight.std().item() - wang) / wang < 0.05
    assert torch.all(mixer.g_proj.bias == 0) and torch.all(mixer.self_aug.w_aug == 0)
    assert mixer.conv.weight.abs().max() <= 0.5


def test_loss_decreases_on_real_text():
    torch.manual_seed(0)
    model = tiny()
    tokens = byte_tokens(8 * 129 * 50)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for step in range(50):
        window = tokens[step * 8 * 129 : (step + 1) * 8 * 129].view(8, 129)
        out = model(window[:, :-1], labels=window[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    print("losses", [round(x, 3) for x in losses[::7]])
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


class TestBadInput:
    def test_out_of_range_token_ids(self):
        model = tiny()
        with pytest.raises(ValueError, match="input_ids must lie in"):
            model(torch.tensor([[1, 2, 512]]))
        with pytest.raises(ValueError, match="input_ids must lie in"):
            model(torch.tensor([[-1, 2]]))

    def test_bad_labels(self):
        model = tiny()
        with pytest.raises(ValueError, match="labels must lie in"):
            model(torch.tensor([[1, 2]]), labels=torch.tensor([[3, 9999]]))

    def test_float_ids_and_shapes(self):
        model = tiny()
        with pytest.raises(ValueError, match="int32 or int64"):
            model(torch.tensor([[1.0, 2.0]]))
        with pytest.raises(ValueError, match=r"\[B, T\]"):
            model(torch.tensor([1, 2]))

    def test_bad_cu_seqlens(self):
        model = tiny()
        with pytest.raises(ValueError, match="cu_seqlens"):
            model(torch.tensor([[1, 2, 3]]), cu_seqlens=torch.tensor([0, 2]))
