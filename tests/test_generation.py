"""Generation with a KV cache through adapted decoders: each decoding step runs the layers on one token
(the cpu backend's few-rows products, the stacked path, the unmerged and basis paths), the prompt on
many (other paths). The logits of every generated position must equal a full forward over the
generated sequence, with left padding in the batch and Coeff-Tuning's head mixing on one query row
against the cached keys."""

from __future__ import annotations

import pytest
import torch

from subspace_ops import methods

pytestmark = pytest.mark.integration
T = pytest.importorskip("transformers")

V = 96


def _llama() -> torch.nn.Module:
    config = T.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return T.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("method", ["rlrr", "ssb", "ia3", "lora", "dora", "siva", "sam-parser", "coeff"])
def test_cached_decoding_matches_a_full_forward(method):
    model, _ = methods.apply(_llama(), method)
    with torch.no_grad():  # move every trained parameter off its identity initialization
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    prompt = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0  # left padding on the first sequence
    new = 5
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, use_cache=True, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
        stepped = torch.stack(out.logits, dim=1)  # [B, new, V]: the prompt's last position, then one per step
        full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], dim=1)
        full = model(out.sequences, attention_mask=full_mask).logits[:, prompt.shape[1] - 1:-1]
    assert out.sequences.shape == (2, prompt.shape[1] + new)
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4)
