"""Export to a Hugging Face LLaMA: the safetensors weights and config.json, read by a plain PyTorch LLaMA written
here (independent of bbm.model) and by transformers where it is installed, give bbm's logits; the export reads
back into bbm; generation produces tokens."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from bbm.data.tokenizer import ByteTokenizer
from bbm.export import write_export
from bbm.generate import generate, main as generate_main
from bbm.model import Decoder, ModelConfig, build_mask
from bbm.trained import Trained, load_trained

N = 24


def llama_logits(weights: dict, config: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (N, V) of one sequence under the LLaMA architecture, from LLaMA-named weights: RMSNorm, rotate-half
    RoPE, grouped-query causal attention, SwiGLU."""
    h, hkv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    eps, n = config["rms_norm_eps"], len(tokens)

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):  # (heads, n, d)
        return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin

    w = {k: v.double() for k, v in weights.items()}
    x = w["model.embed_tokens.weight"][tokens]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(x, w[p + "input_layernorm.weight"])
        q, k, v = ((a @ w[p + f"self_attn.{t}_proj.weight"].T).view(n, -1, d).transpose(0, 1) for t in "qkv")
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(h // hkv, 0), v.repeat_interleave(h // hkv, 0)
        scores = (q @ k.transpose(1, 2) / math.sqrt(d)).masked_fill(~causal, float("-inf"))
        x = x + (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, h * d) @ w[p + "self_attn.o_proj.weight"].T
        m = rms(x, w[p + "post_attention_layernorm.weight"])
        x = x + (F.silu(m @ w[p + "mlp.gate_proj.weight"].T) * (m @ w[p + "mlp.up_proj.weight"].T)) \
            @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return rms(x, w["model.norm.weight"]) @ head.T


def tiny_model(tie: bool) -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80, norm_eps=1e-6,
                      rope_theta=500.0, tie_embeddings=tie, fused=False)
    model = Decoder(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMSNorm gains away from 1, so a mixed-up norm shows
                p.uniform_(0.5, 1.5)
    return model.eval()


def bbm_logits(model, tokens):
    mask = build_mask(torch.zeros(1, len(tokens), dtype=torch.int32), "bbm")
    with torch.no_grad():
        return model.logits(tokens[None], torch.arange(len(tokens))[None], mask)[0].double()


@pytest.mark.parametrize("tie", [True, False])
def test_exported_weights_give_bbm_logits(tmp_path, tie):
    from safetensors.torch import load_file

    model = tiny_model(tie)
    out = write_export(Trained(model, ByteTokenizer(), seq_len=64, source="test"), tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    weights = load_file(out / "model.safetensors")
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] == tie
    assert (config["num_key_value_heads"], config["intermediate_size"], config["eos_token_id"]) == (2, 80, 256)
    assert ("lm_head.weight" in weights) == (not tie)
    tokens = torch.randint(0, 257, (N,), generator=torch.Generator().manual_seed(1))
    want = bbm_logits(model, tokens)
    torch.testing.assert_close(llama_logits(weights, config, tokens), want, rtol=1e-4, atol=1e-4)
    # the export reads back into bbm's decoder
    torch.testing.assert_close(bbm_logits(load_trained(out).model, tokens), want, rtol=0, atol=0)


def test_transformers_reads_the_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(tie=True)
    out = write_export(Trained(model, ByteTokenizer(), seq_len=64, source="test"), tmp_path / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 257, (N,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = hf(tokens[None]).logits[0].double()
    torch.testing.assert_close(got, bbm_logits(model, tokens), rtol=1e-4, atol=1e-4)


def test_generate_produces_tokens(tmp_path, capsys):
    model = tiny_model(tie=True)
    prompt = list(b"def ")
    greedy = generate(model, prompt, 12, context=16, eod_id=-1, greedy=True)
    assert len(greedy) == 12 and all(0 <= t < 257 for t in greedy)
    assert greedy == generate(model, prompt, 12, context=16, eod_id=-1, greedy=True)
    first = greedy[0]
    assert first == int(bbm_logits(model, torch.tensor(prompt))[-1].argmax())  # the most likely next token
    sampled = [generate(model, prompt, 12, context=16, eod_id=-1, seed=s, temperature=1.5) for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] != sampled[2]
    assert generate(model, prompt, 12, context=16, eod_id=first, greedy=True) == []  # stops at end of document
    out = write_export(Trained(model, ByteTokenizer(), seq_len=64, source="test"), tmp_path / "export")
    generate_main([str(out), "--prompt", "def ", "--max-new-tokens", "5", "--greedy"])
    printed = capsys.readouterr()
    assert printed.out.startswith("def ") and "5 tokens" in printed.err
