"""Model behaviour on configurations other than the golden one: the KV cache, generate() and padding
agree with a plain full-sequence forward (the reference here), for every architectural option."""

import pytest
import torch

from tuneport.models.chatglm3 import chatglm3_tiny

CONFIGS = {
    "gqa": {},
    "multi-head": dict(multi_query_attention=False),
    "layernorm-biases-post-residual": dict(rmsnorm=False, post_layer_norm=False, add_bias_linear=True,
                                           apply_residual_connection_post_layernorm=True),
    "prefix-projection": dict(pre_seq_len=3, prefix_projection=True),
    "prefix-embedding-mqa1": dict(pre_seq_len=2, multi_query_group_num=1),
    "rope-ratio-odd-heads": dict(rope_ratio=50.0, kv_channels=12, num_attention_heads=6, multi_query_group_num=3),
}


@pytest.fixture(params=sorted(CONFIGS))
def model(request):
    torch.manual_seed(0)
    return chatglm3_tiny(padded_vocab_size=300, **CONFIGS[request.param]).eval()


def ids(*shape):
    return torch.randint(3, 300, shape, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_cache_prefill_then_decode_equals_full_forward(model):
    x = ids(2, 9)
    full = model(x, use_cache=False).logits
    out = model(x[:, :5], use_cache=True)
    steps = [out.logits]
    for i in range(5, 9):
        out = model(x[:, i: i + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_generate_equals_greedy_loop_without_cache(model):
    x = ids(1, 4)
    generated = model.generate(x, do_sample=False, max_new_tokens=5, eos_token_id=None, pad_token_id=0)
    loop = x
    for _ in range(5):
        next_id = model(loop, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        loop = torch.cat([loop, next_id], dim=1)
    assert generated.tolist() == loop.tolist()


@torch.no_grad()
def test_right_padding_leaves_real_tokens_unchanged(model):
    a, b = ids(1, 7), ids(1, 4)
    batch = torch.cat([a, torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], dim=1)])
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    logits = model(batch, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(logits[0], model(a, use_cache=False).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, :4], model(b, use_cache=False).logits[0], atol=1e-5, rtol=1e-5)


def test_token_normalised_loss_sums_over_micro_batches(model):
    x = ids(2, 6)
    labels = x.clone()
    labels[0, :3] = -100
    whole = model(x, labels=labels, use_cache=False).loss
    counted = int((labels[:, 1:] != -100).sum())
    parts = sum(model(x[i: i + 1], labels=labels[i: i + 1], num_items_in_batch=counted, use_cache=False).loss
                for i in range(2))
    torch.testing.assert_close(parts, whole, atol=1e-6, rtol=1e-6)


def test_stop_tokens_end_generation():
    torch.manual_seed(0)
    model = chatglm3_tiny(padded_vocab_size=300).eval()
    x = ids(1, 4)
    first = model.generate(x, do_sample=False, max_new_tokens=5, eos_token_id=None, pad_token_id=0)[0, 4].item()
    out = model.generate(x, do_sample=False, max_new_tokens=5, eos_token_id=[first, 299], pad_token_id=0)
    assert out[0, 4:].tolist() == [first]
