"""The static-cache decoder computes what the HF model computes: prefill logits, and greedy
decoding through KV-cache slots (rows of different lengths, a slot reused mid-run)."""
from __future__ import annotations

import pytest
import torch

from vpo_ray.pipeline.decoder import DecodeBatch, DecoderWeights, unsupported_reason


def _tiny(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=256)
    if kind == "llama":  # GQA 4:1, untied head, rope scaling of the Llama-3 kind
        cfg = LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        model = LlamaForCausalLM(cfg)
    else:  # QKV biases, tied embeddings
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    with torch.no_grad():  # random init of norms is all ones: perturb so a wrong norm would show
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _greedy_hf(model, prompt: list, n: int) -> list:
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_prefill_logits_match_the_hf_forward(kind):
    model = _tiny(kind)
    w = DecoderWeights(model)
    rows = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    with torch.inference_mode():
        mine = w.last_logits(ids, torch.tensor([len(r) for r in rows]))
        ref = torch.stack([model(input_ids=torch.tensor([r])).logits[0, -1] for r in rows])
    assert (mine - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_decoding_through_slots_matches_hf_generate(kind):
    model = _tiny(kind)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23], [40, 41, 42]]
    n = 12
    with torch.inference_mode():
        expected = [_greedy_hf(model, p, n) for p in prompts]
        batch = DecodeBatch(DecoderWeights(model), slots=2, max_len=64, max_new=n, eos_ids=[])
        got = {}

        def admit(slot_rows):
            slots = [s for s, _ in slot_rows]
            rows = [prompts[i] for _, i in slot_rows]
            width = max(map(len, rows))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            k = len(rows)
            batch.admit(slots, ids, torch.tensor([len(r) for r in rows]), torch.arange(k), torch.zeros(k),
                        torch.ones(k), torch.full((k,), n))

        admit([(0, 0), (1, 1)])
        batch.run(kv_len=32, n=5)  # row 1 still live in slot 1 when slot 0 is refilled below
        got[0] = batch.tokens_of([0], n)[0][:6]
        admit([(0, 2)])  # slot 0 reused while slot 1 keeps decoding row 1
        batch.run(kv_len=64, n=n)
        live, steps = batch.snapshot()
        assert live == [False, False] and steps == [n, n]
        got[1], got[2] = batch.tokens_of([1], n)[0], batch.tokens_of([0], n)[0]
        admit([(1, 3)])
        batch.run(kv_len=64, n=n)
        got[3] = batch.tokens_of([1], n)[0]
    assert got[0] == expected[0][:6]
    assert [got[i] for i in (1, 2, 3)] == [expected[i] for i in (1, 2, 3)]


def test_unsupported_architectures_are_named():
    class Fake(torch.nn.Module):
        config = type("C", (), {"model_type": "gpt2"})()

    assert "gpt2" in unsupported_reason(Fake())
    assert unsupported_reason(_tiny("qwen2")) is None


def test_fused_weights_leave_the_hf_model_working_without_copies():
    model = _tiny("llama")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        w = DecoderWeights(model)
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == w.layers[0].wqkv[attn.q_proj.out_features:].data_ptr()


def test_top_k_step_draws_the_full_sorts_tokens_when_undecided_rows_wait_for_it():
    """The step sorts the whole vocabulary for at most `fallback_rows` rows; other undecided rows
    wait a step. Tokens equal the full sort's step for step."""
    model = _tiny("llama")
    w = DecoderWeights(model)
    prompts = [[5, 6, 7, 8], [3, 4], [20, 21, 22], [40, 41, 42, 43, 44]]
    ids = torch.tensor([p + [0] * (5 - len(p)) for p in prompts])

    def run(top_k: int):
        batch = DecodeBatch(w, slots=4, max_len=64, max_new=16, eos_ids=[], top_k=top_k)
        # low temperatures make peaked rows the pre-filter decides (the random model is flat: the others)
        batch.admit([0, 1, 2, 3], ids, torch.tensor([len(p) for p in prompts]), torch.arange(4) + 7,
                    torch.tensor([0.02, 0.05, 1.0, 1.0]), torch.tensor([0.3, 0.6, 0.9, 1.0]),
                    torch.full((4,), 16), None)
        while True:
            batch.fallback_rows = 1  # (a host check would widen it): undecided rows queue for the sort
            batch.run(64, 3)
            if not any(batch.snapshot()[0]):
                return batch
    with torch.inference_mode():
        full, fast = run(0), run(8)
    assert torch.equal(fast.out, full.out)
    assert int(fast.waited) > 0 and 0 < int(fast.full_sorted) < 4 * 15  # both paths ran, rows waited
