#!/usr/bin/env python3
"""Generate golden logits for the Rust engine with Hugging Face `transformers`.

For every case in CASES this script

  1. trains a tiny byte-level BPE tokenizer (vocab size == config.vocab_size)
     on the short English text in CORPUS and writes tokenizer.json +
     tokenizer_config.json (with a chat template);
  2. builds a small random-weight model with `transformers` (seeded), saves it
     with `save_pretrained` (config.json, generation_config.json,
     model.safetensors), storing the weights as float32 or bfloat16;
  3. runs the float32 model (for bf16 cases: the bf16-rounded weights, i.e. the
     exact upcast of what was stored) with prefill + incremental greedy decoding
     with the KV cache, on CPU with eager attention under torch.no_grad(), and
     writes golden.safetensors + golden.json;
  4. self-checks: reloading the saved directory with `from_pretrained` gives
     bit-identical logits, `generate(do_sample=False)` reproduces greedy_ids,
     the tokenizer loads with AutoTokenizer and renders its chat template, and a
     float64 run measures how large plain f32 rounding is.

Run from the repository root inside the virtualenv described in README.md:

    python scripts/golden/make_golden.py            # regenerate everything
    python scripts/golden/make_golden.py --verify   # recompute from the committed
                                                    # model dirs and compare

Output: testdata/golden/<case>/.

A second mode takes an existing (e.g. trained) Hugging Face model directory
instead of building a random one, tokenizes a text prompt with its
tokenizer.json, and writes only golden.safetensors + golden.json (which records
the model directory relative to the repository root) to testdata/golden/<name>/:

    python scripts/golden/make_golden.py --model-dir models/driftwood-mini --prompt "Once upon a time" --steps 16
    python scripts/golden/make_golden.py --verify --model-dir models/driftwood-mini
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

import safetensors
import tokenizers
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "testdata" / "golden"
COMMAND = "python scripts/golden/make_golden.py"

PROMPT_LEN = 12  # P
DECODE_STEPS = 6  # D
PROMPT_SEED_BASE = 1000
MAX_PROMPT_TRIES = 200
# A greedy step is accepted only if top-1 beats top-2 by at least this fraction
# of max|logits|, i.e. 20x the bf16-case tolerance, so that an engine inside
# tolerance can never pick a different greedy token.
MIN_MARGIN_REL = 2e-2
# Random models with tied embeddings like to repeat one token; ask for a few
# distinct greedy tokens so decode steps see different inputs.
MIN_DISTINCT_GREEDY = 3

TOL_F32 = 1e-4
TOL_BF16 = 1e-3

# ---------------------------------------------------------------------------
# Tokenizer training text (written for this file; any English prose would do).
# ---------------------------------------------------------------------------
CORPUS = [
    "Driftwood washes up on the shore after a storm. Some pieces are smooth and pale, "
    "worn by years of salt water and sand; others still carry bark and the shape of the "
    "branch they once were. People walking the beach in the morning pick up the "
    "interesting ones, carry them home, and set them on a window sill.",
    "A small program runs inside a sandbox. It cannot open files or sockets on its own; "
    "instead it asks the host for what it needs through a narrow set of functions. The "
    "host decides what to allow, keeps track of memory, and stops the program if it runs "
    "for too long or asks for too much.",
    "The model reads a sequence of tokens and predicts the next one. Each token becomes a "
    "vector, the vectors pass through a stack of layers, and at the end a large matrix "
    "turns the final vector into one score for every word in the vocabulary. The highest "
    "score wins when decoding greedily.",
    "Attention lets every position look back at the positions before it. Queries, keys "
    "and values are computed from the hidden state; rotary position embeddings twist the "
    "queries and keys by an angle that grows with the position, so that the dot product "
    "depends on the distance between two tokens.",
    "The cache keeps the keys and values that were already computed, so that producing "
    "one more token needs only one more row. Without it the model would recompute the "
    "whole prompt for every new token, which is slow and wasteful when the answer is "
    "long.",
    "On a quiet evening the harbour lights come on one by one. Fishing boats return with "
    "their nets folded, gulls circle over the pier, and the smell of bread drifts out of "
    "the bakery at the corner of the square. Tomorrow the market opens at six.",
    "Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100, 256, 1024 and 65536 show "
    "up in code and prose alike. Punctuation too: commas, full stops; colons: dashes - "
    "and (brackets), \"quotes\", 'apostrophes', question marks? and exclamation marks!",
    "Testing against a trusted reference is the simplest way to catch a wrong sign, a "
    "swapped axis, or an off-by-one error in a position. Small random models are enough: "
    "if every logit agrees to within rounding, the arithmetic is almost certainly right.",
]

# Chat templates (plain Jinja, no Python-only string methods).
TEMPLATE_LLAMA2 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<<SYS>>\n{{ message['content'] }}\n<</SYS>>\n\n"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)
TEMPLATE_MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST]{{ message['content'] }}[/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)
TEMPLATE_LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
TEMPLATE_CHATML = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Tokenizer flavours. `specials_at_end`: special tokens take the last ids (as in
# Llama 3 / Qwen2) instead of the first ones (as in Llama 2 / Mistral / SmolLM2).
TOKENIZERS = {
    "llama2": dict(
        vocab_size=320,
        specials=["<unk>", "<s>", "</s>"],
        specials_at_end=False,
        bos="<s>", eos="</s>", unk="<unk>", pad=None,
        eos_ids=["</s>"],
        template=TEMPLATE_LLAMA2,
    ),
    "mistral": dict(
        vocab_size=352,
        specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        specials_at_end=False,
        bos="<s>", eos="</s>", unk="<unk>", pad=None,
        eos_ids=["</s>"],
        template=TEMPLATE_MISTRAL,
    ),
    "smollm2": dict(
        vocab_size=384,
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        specials_at_end=False,
        bos="<|im_start|>", eos="<|im_end|>", unk="<|endoftext|>", pad="<|im_end|>",
        eos_ids=["<|im_end|>"],
        template=TEMPLATE_CHATML,
    ),
    "llama3": dict(
        vocab_size=448,
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"],
        specials_at_end=True,
        bos="<|begin_of_text|>", eos="<|eot_id|>", unk=None, pad=None,
        eos_ids=["<|end_of_text|>", "<|eot_id|>"],  # config carries a list, like Llama 3.1 Instruct
        template=TEMPLATE_LLAMA3,
    ),
    "qwen2": dict(
        vocab_size=512,
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        specials_at_end=True,
        bos=None, eos="<|im_end|>", unk=None, pad="<|endoftext|>",
        eos_ids=["<|im_end|>"],
        template=TEMPLATE_CHATML,
    ),
}

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    hidden_act="silu",
)

# name -> case definition
CASES = {
    "llama2-f32": dict(
        arch="LlamaForCausalLM", tok="llama2", weights_dtype="float32", seed=11,
        config=dict(intermediate_size=128, num_key_value_heads=4, tie_word_embeddings=False,
                    rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    "llama3-f32": dict(
        arch="LlamaForCausalLM", tok="llama3", weights_dtype="float32", seed=12,
        config=dict(intermediate_size=160, num_key_value_heads=2, tie_word_embeddings=True,
                    rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}),
    ),
    "smollm2-f32": dict(
        arch="LlamaForCausalLM", tok="smollm2", weights_dtype="float32", seed=13,
        config=dict(intermediate_size=144, num_key_value_heads=1, tie_word_embeddings=True,
                    rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    ),
    "qwen2-f32": dict(
        arch="Qwen2ForCausalLM", tok="qwen2", weights_dtype="float32", seed=14,
        config=dict(intermediate_size=176, num_key_value_heads=2, tie_word_embeddings=True,
                    rms_norm_eps=1e-6, use_sliding_window=False, max_window_layers=1,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    ),
    "mistral-f32": dict(
        arch="MistralForCausalLM", tok="mistral", weights_dtype="float32", seed=15,
        config=dict(intermediate_size=192, num_key_value_heads=2, tie_word_embeddings=False,
                    rms_norm_eps=1e-5, sliding_window=4096,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    ),
}
# bf16 variants: same config, seed and tokenizer as their f32 case.
CASES["llama3-bf16"] = dict(CASES["llama3-f32"], weights_dtype="bfloat16")
CASES["qwen2-bf16"] = dict(CASES["qwen2-f32"], weights_dtype="bfloat16")

# Written into config.json after save_pretrained so that loaders which only know
# the older key names see the same values; see `legacy_config_keys`.
QWEN2_UNUSED_SLIDING_WINDOW = 8

CONFIG_CLASSES = {
    "LlamaForCausalLM": LlamaConfig,
    "Qwen2ForCausalLM": Qwen2Config,
    "MistralForCausalLM": MistralConfig,
}


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------
def build_tokenizer(spec: dict) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    n_special = len(spec["specials"])
    if spec["specials_at_end"]:
        trainer = trainers.BpeTrainer(
            vocab_size=spec["vocab_size"] - n_special, min_frequency=1, special_tokens=[],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(CORPUS, trainer=trainer)
        tok.add_special_tokens(spec["specials"])
    else:
        trainer = trainers.BpeTrainer(
            vocab_size=spec["vocab_size"], min_frequency=1, special_tokens=spec["specials"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(CORPUS, trainer=trainer)
    size = tok.get_vocab_size(with_added_tokens=True)
    if size != spec["vocab_size"]:
        raise SystemExit(f"tokenizer has {size} tokens, wanted {spec['vocab_size']}: add more CORPUS text")
    return tok


def write_tokenizer(tok: Tokenizer, spec: dict, out: Path) -> dict:
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in spec["specials"]}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": COMMON["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "bos_token": spec["bos"],
        "eos_token": spec["eos"],
        "unk_token": spec["unk"],
        "pad_token": spec["pad"],
        "chat_template": spec["template"],
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for t, i in sorted(ids.items(), key=lambda kv: kv[1])
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return ids


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------
def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic init with larger-than-default scales so that attention is
    far from uniform, RMSNorm weights are not all ones, biases are non-zero and
    the logits spread over a few units (clear greedy margins)."""
    g = torch.Generator().manual_seed(seed)
    seen = set()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if id(p) in seen:  # tied lm_head
                continue
            seen.add(id(p))
            shape = p.shape
            if name.endswith("norm.weight"):
                v = 0.6 + 0.8 * torch.rand(shape, generator=g)
            elif name.endswith(".bias"):
                v = 0.5 * torch.randn(shape, generator=g)
            elif name.endswith("embed_tokens.weight"):
                v = 0.3 * torch.randn(shape, generator=g)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                v = 2.0 * torch.randn(shape, generator=g) / math.sqrt(shape[1])
            elif name.endswith("lm_head.weight"):
                v = 4.0 * torch.randn(shape, generator=g) / math.sqrt(shape[1])
            elif p.dim() == 2:
                v = 1.0 * torch.randn(shape, generator=g) / math.sqrt(shape[1])
            else:
                raise RuntimeError(f"unexpected parameter {name} {tuple(shape)}")
            p.copy_(v.to(p.dtype))


def make_config(case: dict, tok_ids: dict, tspec: dict):
    cls = CONFIG_CLASSES[case["arch"]]
    kw = dict(COMMON)
    kw.update(case["config"])
    kw["rope_parameters"] = dict(kw["rope_parameters"])
    kw["vocab_size"] = tspec["vocab_size"]
    kw["bos_token_id"] = tok_ids[tspec["bos"]] if tspec["bos"] else None
    eos = [tok_ids[t] for t in tspec["eos_ids"]]
    kw["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    kw["architectures"] = [case["arch"]]
    if case["arch"] == "Qwen2ForCausalLM":
        kw["attention_dropout"] = 0.0
    return cls(**kw)


def legacy_config_keys(path: Path, case_name: str, case: dict) -> None:
    """transformers 5 writes `rope_parameters` and `dtype`; checkpoints written by
    transformers 4 (most published models) use `rope_theta`, `rope_scaling` and
    `torch_dtype`. Write both so either kind of loader reads the same model.
    transformers gives `rope_scaling` priority over `rope_parameters` on load and
    the two agree here; the script checks that the reloaded config is unchanged."""
    cfg = json.loads(path.read_text())
    rp = dict(cfg["rope_parameters"])
    cfg["rope_theta"] = rp["rope_theta"]
    if rp["rope_type"] == "default":
        cfg["rope_scaling"] = None
    else:
        cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    cfg["torch_dtype"] = cfg["dtype"]
    if case["arch"] == "Qwen2ForCausalLM":
        # Published Qwen2 configs carry a sliding_window value together with
        # use_sliding_window=false. transformers then ignores the window (full
        # causal attention in every layer). A small value here makes an engine
        # that wrongly applies it fail the golden test.
        assert cfg["use_sliding_window"] is False
        cfg["sliding_window"] = QWEN2_UNUSED_SLIDING_WINDOW
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def build_model(case: dict, config):
    """Float32 model; for bf16 cases its parameters are rounded to bfloat16
    values (kept in float32), i.e. exactly what loading the stored bf16 weights
    and upcasting gives. (Casting the whole module to bf16 and back would also
    round the non-persistent rotary inv_freq buffer, which the reloaded model
    recomputes in float32.)"""
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    init_weights(model, case["seed"])
    if case["weights_dtype"] == "bfloat16":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    model.eval()
    return model


def save_model(model, case: dict, out: Path) -> None:
    if case["weights_dtype"] == "bfloat16":
        copy = AutoModelForCausalLM.from_config(model.config, attn_implementation="eager", dtype=torch.bfloat16)
        copy.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
        copy.save_pretrained(str(out))
    else:
        model.save_pretrained(str(out))


def load_dir(path: Path, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    model.eval()
    return model


# ---------------------------------------------------------------------------
# Reference computation
# ---------------------------------------------------------------------------
@torch.no_grad()
def run_reference(model, prompt_ids: torch.Tensor, steps: int):
    """Prefill with the KV cache, then `steps` single-token decode steps."""
    out = model(input_ids=prompt_ids[None, :], use_cache=True)
    prefill = out.logits[0].clone()
    past = out.past_key_values
    rows = [prefill[-1].clone()]
    greedy = []
    for _ in range(steps):
        nxt = int(torch.argmax(rows[-1]))
        greedy.append(nxt)
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        rows.append(out.logits[0, -1].clone())
    return prefill, torch.stack(rows), torch.tensor(greedy, dtype=torch.int64)


def top1_margins(step_logits: torch.Tensor) -> list[float]:
    top2 = torch.topk(step_logits.double(), 2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).tolist()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def describe_case(name: str, case: dict, config, tok_ids: dict, tspec: dict) -> dict:
    rp = dict(config.rope_parameters)
    head_dim = config.hidden_size // config.num_attention_heads
    d = {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": head_dim,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rp,
        "tie_word_embeddings": config.tie_word_embeddings,
        "qkv_bias": case["arch"] == "Qwen2ForCausalLM",
        "special_token_ids": tok_ids,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }
    if rp["rope_type"] == "llama3":
        # Show which rotary frequencies the llama3 scaling leaves alone, divides
        # by `factor`, or interpolates, at this head_dim.
        theta = rp["rope_theta"]
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        wavelen = 2 * math.pi / inv
        low = rp["original_max_position_embeddings"] / rp["low_freq_factor"]
        high = rp["original_max_position_embeddings"] / rp["high_freq_factor"]
        regimes = ["kept" if w < high else "divided_by_factor" if w > low else "smoothed"
                   for w in wavelen.tolist()]
        for want in ("kept", "divided_by_factor", "smoothed"):
            assert want in regimes, f"llama3 scaling does not exercise '{want}' at head_dim {head_dim}"
        d["llama3_rope_frequency_regimes"] = regimes
    return d


# ---------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------
def make_case(name: str, case: dict, out_root: Path, versions: dict) -> dict:
    tspec = TOKENIZERS[case["tok"]]
    out = out_root / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    tok = build_tokenizer(tspec)
    tok_ids = write_tokenizer(tok, tspec, out)
    config = make_config(case, tok_ids, tspec)
    # Float32 model for the reference: for bf16 cases its weights are the exact
    # upcast of the stored bf16 weights.
    ref_model = build_model(case, config)
    save_model(ref_model, case, out)
    legacy_config_keys(out / "config.json", name, case)

    special = set(tok_ids.values())
    allowed = torch.tensor([i for i in range(config.vocab_size) if i not in special])
    for attempt in range(MAX_PROMPT_TRIES):
        prompt_seed = PROMPT_SEED_BASE + 100 * case["seed"] + attempt
        g = torch.Generator().manual_seed(prompt_seed)
        prompt = allowed[torch.randint(len(allowed), (PROMPT_LEN,), generator=g)]
        prefill, steps, greedy = run_reference(ref_model, prompt, DECODE_STEPS)
        max_ref = max(prefill.abs().max().item(), steps.abs().max().item())
        margins = top1_margins(steps)[:DECODE_STEPS]
        ok_margin = min(margins) >= MIN_MARGIN_REL * max_ref
        ok_special = not any(int(t) in special for t in greedy)
        ok_varied = len(set(greedy.tolist())) >= MIN_DISTINCT_GREEDY
        if ok_margin and ok_special and ok_varied:
            break
    else:
        raise SystemExit(f"{name}: no prompt with clear greedy margins in {MAX_PROMPT_TRIES} tries")

    # --- self-checks -------------------------------------------------------
    reloaded = load_dir(out)
    assert dict(reloaded.config.rope_parameters) == dict(config.rope_parameters), \
        (reloaded.config.rope_parameters, config.rope_parameters)
    assert reloaded.config.tie_word_embeddings == config.tie_word_embeddings
    assert getattr(reloaded.config, "sliding_window", None) == getattr(config, "sliding_window", None)
    if case["arch"] == "Qwen2ForCausalLM":
        assert reloaded.config.sliding_window is None
        assert set(reloaded.config.layer_types) == {"full_attention"}
    for (n1, p1), (n2, p2) in zip(sorted(ref_model.state_dict().items()),
                                  sorted(reloaded.state_dict().items())):
        assert n1 == n2 and torch.equal(p1, p2), n1
    prefill2, steps2, greedy2 = run_reference(reloaded, prompt, DECODE_STEPS)
    assert torch.equal(prefill, prefill2), f"{name}: reload changed prefill logits"
    assert torch.equal(steps, steps2), f"{name}: reload changed step logits"
    assert torch.equal(greedy, greedy2)
    # The decode-step logits must agree with a full (no-cache) forward pass over
    # prompt + greedy tokens up to f32 rounding.
    with torch.no_grad():
        full = reloaded(input_ids=torch.cat([prompt, greedy])[None], use_cache=False).logits[0]
    nocache_diff = (full[PROMPT_LEN - 1:] - steps).abs().max().item()
    assert nocache_diff <= 1e-5 * max_ref, f"{name}: cache vs no-cache differ by {nocache_diff}"
    assert torch.equal(full[:PROMPT_LEN].argmax(-1), prefill.argmax(-1))
    with torch.no_grad():
        gen = reloaded.generate(prompt[None], attention_mask=torch.ones(1, PROMPT_LEN, dtype=torch.long),
                                do_sample=False, max_new_tokens=DECODE_STEPS, min_new_tokens=0)
    assert torch.equal(gen[0, PROMPT_LEN:], greedy), f"{name}: generate() gave {gen[0, PROMPT_LEN:]} vs {greedy}"
    # float64 run on the same weights: how large plain f32 rounding is.
    f64 = load_dir(out, dtype=torch.float64)
    pf64, st64, gr64 = run_reference(f64, prompt, DECODE_STEPS)
    assert torch.equal(gr64, greedy)
    f32_vs_f64 = max((prefill.double() - pf64).abs().max().item(),
                     (steps.double() - st64).abs().max().item()) / max_ref
    # Tokenizer loads and renders its chat template.
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    assert len(hf_tok) == config.vocab_size, (len(hf_tok), config.vocab_size)
    msgs = [{"role": "user", "content": "Where does driftwood come from?"}]
    if tspec["template"] in (TEMPLATE_LLAMA3, TEMPLATE_CHATML):
        rendered = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        rendered = hf_tok.apply_chat_template(msgs, tokenize=False)
    rendered_ids = tok.encode(rendered).ids
    text = "The harbour lights come on one by one."
    assert tok.decode(tok.encode(text).ids) == text

    # --- write golden -------------------------------------------------------
    tensors = {
        "prompt_ids": prompt.to(torch.int64).contiguous(),
        "greedy_ids": greedy.to(torch.int64).contiguous(),
        "step_logits": steps.to(torch.float32).contiguous(),
        "prefill_logits": prefill.to(torch.float32).contiguous(),
    }
    save_file(tensors, str(out / "golden.safetensors"), metadata={"case": name})
    back = load_file(str(out / "golden.safetensors"))
    for k, v in tensors.items():
        assert torch.equal(back[k], v)

    bf16 = case["weights_dtype"] == "bfloat16"
    tol = TOL_BF16 if bf16 else TOL_F32
    info = {
        "case": name,
        "architecture": case["arch"],
        "model_type": config.model_type,
        "weights_dtype": case["weights_dtype"],
        "compute_dtype": "float32",
        "compute_note": (
            "Weights are stored as bfloat16 in model.safetensors; the reference loads them and upcasts "
            "to float32 (exact), then computes entirely in float32." if bf16 else
            "Weights are stored and computed in float32."),
        "reference": "transformers, CPU, attn_implementation=eager, torch.no_grad(), 1 thread; "
                     "prefill of prompt_ids with use_cache=True, then one forward per greedy token "
                     "with the returned KV cache",
        "files": {
            "model": ["config.json", "generation_config.json", "model.safetensors"],
            "tokenizer": ["tokenizer.json", "tokenizer_config.json"],
            "golden": "golden.safetensors",
        },
        "tensors": {
            "prompt_ids": {"dtype": "int64", "shape": [PROMPT_LEN],
                           "meaning": "prompt token ids (random, no special tokens)"},
            "greedy_ids": {"dtype": "int64", "shape": [DECODE_STEPS],
                           "meaning": "greedy_ids[i] = argmax(step_logits[i])"},
            "step_logits": {"dtype": "float32", "shape": [DECODE_STEPS + 1, config.vocab_size],
                            "meaning": "row 0: logits at the last prompt position after prefill; "
                                       "row i>0: logits after feeding greedy_ids[i-1] as a decode step "
                                       "(position P+i-1)"},
            "prefill_logits": {"dtype": "float32", "shape": [PROMPT_LEN, config.vocab_size],
                               "meaning": "logits at every prompt position from the prefill"},
        },
        "prompt_ids": prompt.tolist(),
        "greedy_ids": greedy.tolist(),
        "prompt_seed": prompt_seed,
        "weight_seed": case["seed"],
        "model": describe_case(name, case, config, tok_ids, tspec),
        "max_abs_ref": {"step_logits": steps.abs().max().item(),
                        "prefill_logits": prefill.abs().max().item(),
                        "all": max_ref},
        "tolerance": {
            "rule": "max |ours - ref| <= rel * max|ref|, per tensor over all logits "
                    "(step_logits and prefill_logits); greedy_ids must match exactly",
            "rel": tol,
            "explanation": (
                "bf16->f32 conversion is exact, so an engine that upcasts the same bf16 weights and computes "
                "in f32 performs the same f32 computation as the reference; the remaining difference is f32 "
                "rounding from a different summation order (see observed_f32_vs_f64_rel, same order of "
                "magnitude as the f32 cases). 1e-3 leaves headroom for an engine that keeps the bf16 "
                "weights in a fused bf16 x f32 kernel or rounds intermediate activations differently; a "
                "wrong rope, mask, bias or norm shows up as errors of order 1e-1 and above." if bf16 else
                "f32 reference on f32 weights; an f32 engine differs only by summation order and "
                "transcendental-function rounding, which stays far below 1e-4 of the largest logit "
                "(see observed_f32_vs_f64_rel)."),
            "observed_f32_vs_f64_rel": f32_vs_f64,
            "cache_vs_full_forward_rel": nocache_diff / max_ref,
        },
        "min_top1_margin_rel": min(margins) / max_ref,
        "chat_template_example": {"messages": msgs, "rendered": rendered, "ids": rendered_ids},
        "model_safetensors_sha256": sha256(out / "model.safetensors"),
        "versions": versions,
        "regenerate": f"{COMMAND}  (from the repository root, in the virtualenv from scripts/golden/README.md)",
        "notes": case_notes(name, case),
    }
    (out / "golden.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return info


def case_notes(name: str, case: dict) -> list[str]:
    notes = [
        "RoPE follows transformers' rotate_half convention on the HF weight layout: the head vector is split "
        "in halves [x1, x2] and rotated as (x1*cos - x2*sin, x2*cos + x1*sin), with frequency j used for "
        "both index j and j + head_dim/2 (not interleaved pairs).",
        "inv_freq = 1 / rope_theta ** (arange(0, head_dim, 2) / head_dim) computed in float32; angles = "
        "position * inv_freq in float32, then cos/sin.",
        "config.json has both the transformers-5 keys (rope_parameters, dtype) and the older keys "
        "(rope_theta, rope_scaling, torch_dtype) with the same values.",
    ]
    cfg = case["config"]
    if cfg["tie_word_embeddings"]:
        notes.append("tie_word_embeddings is true and model.safetensors has no lm_head.weight: the output "
                     "projection is model.embed_tokens.weight.")
    else:
        notes.append("tie_word_embeddings is false and model.safetensors has its own lm_head.weight.")
    if cfg["rope_parameters"]["rope_type"] == "llama3":
        notes.append(
            "llama3 rope scaling (transformers _compute_llama3_parameters): wavelen = 2*pi/inv_freq; "
            "low_wl = original_max_position_embeddings/low_freq_factor; high_wl = "
            "original_max_position_embeddings/high_freq_factor; if wavelen < high_wl keep inv_freq; if "
            "wavelen > low_wl use inv_freq/factor; otherwise smooth = (original_max_position_embeddings/"
            "wavelen - low_freq_factor)/(high_freq_factor - low_freq_factor) and inv_freq' = (1-smooth)*"
            "inv_freq/factor + smooth*inv_freq. Applied regardless of sequence length; no attention scaling "
            "(cos/sin multiplied by 1.0).")
    if case["arch"] == "Qwen2ForCausalLM":
        notes.append(
            f"config.json has use_sliding_window=false with sliding_window={QWEN2_UNUSED_SLIDING_WINDOW} and "
            "max_window_layers=1: transformers sets sliding_window to None when use_sliding_window is false, "
            "so every layer uses full causal attention (layer_types are all full_attention). Prompt + decode "
            f"spans {PROMPT_LEN + DECODE_STEPS} positions, so an engine that applies the window fails.")
        notes.append("q_proj, k_proj and v_proj have biases (random, non-zero); o_proj and the MLP have none.")
    if case["arch"] == "MistralForCausalLM":
        notes.append("sliding_window=4096 is larger than max_position_embeddings, so attention is plain causal.")
    if cfg["num_key_value_heads"] != COMMON["num_attention_heads"]:
        notes.append(f"GQA: {COMMON['num_attention_heads']} query heads share {cfg['num_key_value_heads']} KV "
                     "heads; query head h uses KV head h // (heads / kv_heads).")
    return notes


def verify(out_root: Path, names: list[str]) -> None:
    """Recompute every golden file from the committed model dirs and compare."""
    failed = False
    for name in names:
        d = out_root / name
        g = load_file(str(d / "golden.safetensors"))
        info = json.loads((d / "golden.json").read_text())
        model = load_dir(REPO_ROOT / info["model_dir"] if "model_dir" in info else d)
        prefill, steps, greedy = run_reference(model, g["prompt_ids"], len(g["greedy_ids"]))
        tol = info["tolerance"]["rel"]
        worst = 0.0
        for key, ours in (("prefill_logits", prefill), ("step_logits", steps)):
            ref = g[key]
            worst = max(worst, ((ours - ref).abs().max() / ref.abs().max()).item())
        ok = torch.equal(greedy, g["greedy_ids"]) and worst <= tol
        failed |= not ok
        print(f"{name:16s} {'ok' if ok else 'FAIL'}  max rel diff {worst:.3e} (tol {tol:g}), "
              f"greedy {'same' if torch.equal(greedy, g['greedy_ids']) else 'DIFFERENT'}")
    if failed:
        sys.exit(1)


# ---------------------------------------------------------------------------
# Existing model directory (--model-dir)
# ---------------------------------------------------------------------------
def read_safetensors_header(path: Path) -> dict:
    raw = path.open("rb")
    with raw:
        n = int.from_bytes(raw.read(8), "little")
        header = json.loads(raw.read(n))
    header.pop("__metadata__", None)
    return header


def repo_relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        raise SystemExit(f"{path} is not inside the repository ({REPO_ROOT}); golden.json records the "
                         "model directory relative to the repository root")


def make_from_dir(model_dir: Path, name: str, prompt_text: str, prepend_bos: bool, n_steps: int,
                  out_root: Path, versions: dict) -> dict:
    """Golden logits for an existing model directory. Nothing in `model_dir` is
    written; only golden.safetensors and golden.json go to out_root/name."""
    model_dir = model_dir if model_dir.is_absolute() else (Path.cwd() / model_dir)
    rel_dir = repo_relative(model_dir)
    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("golden.safetensors", "golden.json"):
        (out / stale).unlink(missing_ok=True)
    extra = sorted(p.name for p in out.iterdir())
    assert not extra, f"{out} holds other files: {extra}"

    # Stored weights: record their dtype(s); the reference upcasts them to f32.
    header = read_safetensors_header(model_dir / "model.safetensors")
    stored_dtypes = sorted({meta["dtype"] for meta in header.values()})
    weights_dtype = {"BF16": "bfloat16", "F32": "float32", "F16": "float16"}.get(
        stored_dtypes[0], stored_dtypes[0]) if len(stored_dtypes) == 1 else "mixed " + "/".join(stored_dtypes)

    # Prompt: the model's own tokenizer.json, optionally after bos.
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text_ids = tok.encode(prompt_text, add_special_tokens=False).ids
    assert tok.encode(prompt_text).ids == text_ids, "tokenizer.json adds special tokens on its own"
    ref_model = load_dir(model_dir)
    config = ref_model.config
    bos = config.bos_token_id
    if prepend_bos:
        assert bos is not None, "config has no bos_token_id; use --no-bos"
        prompt_list = [int(bos)] + text_ids
    else:
        prompt_list = text_ids
    prompt = torch.tensor(prompt_list, dtype=torch.int64)
    P = len(prompt_list)
    hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert hf_tok(prompt_text, add_special_tokens=False)["input_ids"] == text_ids, "AutoTokenizer disagrees"
    assert len(hf_tok) == config.vocab_size, (len(hf_tok), config.vocab_size)

    # The f32 parameters are exactly the stored weights, upcast.
    stored = load_file(str(model_dir / "model.safetensors"))
    params = ref_model.state_dict()
    for k, v in stored.items():
        assert params[k].dtype == torch.float32, (k, params[k].dtype)
        assert torch.equal(params[k], v.to(torch.float32)), f"{k}: loaded f32 weight is not the stored one upcast"
    if config.tie_word_embeddings:
        assert "lm_head.weight" not in stored
        assert torch.equal(params["lm_head.weight"], params["model.embed_tokens.weight"])

    prefill, steps, greedy = run_reference(ref_model, prompt, n_steps)
    max_ref = max(prefill.abs().max().item(), steps.abs().max().item())
    margins = top1_margins(steps)
    row_max = steps.abs().max(dim=-1).values.double().tolist()
    # Same criterion as for the random cases, but only recorded: the prompt is fixed.
    margin_rel = min(margins) / max_ref
    weakest_step = int(min(range(len(margins)), key=lambda i: margins[i]))

    # --- self-checks (as for the random cases) -----------------------------
    with torch.no_grad():
        full = ref_model(input_ids=torch.cat([prompt, greedy])[None], use_cache=False).logits[0]
    nocache_diff = (full[P - 1:] - steps).abs().max().item()
    assert nocache_diff <= 1e-5 * max_ref, f"{name}: cache vs no-cache differ by {nocache_diff}"
    assert torch.equal(full[:P].argmax(-1), prefill.argmax(-1))
    # generate(): plain greedy, none of generation_config.json's sampling settings
    # or repetition penalty, and no early stop at eos.
    gcfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=n_steps, min_new_tokens=n_steps,
                                         num_beams=1, repetition_penalty=1.0, eos_token_id=None,
                                         pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0)
    with torch.no_grad():
        gen = ref_model.generate(prompt[None], attention_mask=torch.ones(1, P, dtype=torch.long),
                                 generation_config=gcfg)
    assert torch.equal(gen[0, P:], greedy), f"{name}: generate() gave {gen[0, P:]} vs {greedy}"
    f64 = load_dir(model_dir, dtype=torch.float64)
    pf64, st64, gr64 = run_reference(f64, prompt, n_steps)
    f64_same_greedy = torch.equal(gr64, greedy)
    f32_vs_f64 = max((prefill.double() - pf64).abs().max().item(),
                     (steps.double() - st64).abs().max().item()) / max_ref
    del f64

    # --- write golden -------------------------------------------------------
    tensors = {
        "prompt_ids": prompt.to(torch.int64).contiguous(),
        "greedy_ids": greedy.to(torch.int64).contiguous(),
        "step_logits": steps.to(torch.float32).contiguous(),
        "prefill_logits": prefill.to(torch.float32).contiguous(),
    }
    # One metadata key only: safetensors writes metadata in hash-map order, so
    # several keys would make the file bytes vary from run to run.
    save_file(tensors, str(out / "golden.safetensors"), metadata={"case": name})
    back = load_file(str(out / "golden.safetensors"))
    for k, v in tensors.items():
        assert torch.equal(back[k], v)

    greedy_list = greedy.tolist()
    special_ids = sorted(int(i) for i in hf_tok.all_special_ids)
    greedy_text = tok.decode(greedy_list, skip_special_tokens=False)
    bf16 = weights_dtype == "bfloat16"
    tol = TOL_BF16 if bf16 else TOL_F32
    rp = dict(config.rope_parameters)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cmd = f"{COMMAND} --model-dir {rel_dir} --prompt {json.dumps(prompt_text)} --steps {n_steps}"
    if not prepend_bos:
        cmd += " --no-bos"
    if name != Path(rel_dir).name:
        cmd += f" --name {name}"
    info = {
        "case": name,
        "model_dir": rel_dir,
        "architecture": config.architectures[0] if config.architectures else type(ref_model).__name__,
        "model_type": config.model_type,
        "weights_dtype": weights_dtype,
        "compute_dtype": "float32",
        "compute_note": (
            f"An existing (trained) model: the weights are read from {rel_dir}/model.safetensors (stored as "
            f"{weights_dtype}), upcast to float32 (exact for bf16) and everything is computed in float32. "
            "This directory holds only the golden files; the model, config and tokenizer are in model_dir "
            "(relative to the repository root)."),
        "reference": "transformers, CPU, attn_implementation=eager, torch.no_grad(), 1 thread; "
                     "prefill of prompt_ids with use_cache=True, then one forward per greedy token "
                     "with the returned KV cache; plain argmax (generation_config.json's sampling "
                     "settings and repetition penalty are not used, and decoding does not stop at eos)",
        "files": {
            "model_dir": rel_dir,
            "model": ["config.json", "model.safetensors"],
            "tokenizer": ["tokenizer.json", "tokenizer_config.json"],
            "golden": "golden.safetensors",
        },
        "tensors": {
            "prompt_ids": {"dtype": "int64", "shape": [P],
                           "meaning": (f"bos ({bos}) followed by " if prepend_bos else "") +
                                      f"tokenizer.json's encoding of prompt_text"},
            "greedy_ids": {"dtype": "int64", "shape": [n_steps],
                           "meaning": "greedy_ids[i] = argmax(step_logits[i])"},
            "step_logits": {"dtype": "float32", "shape": [n_steps + 1, config.vocab_size],
                            "meaning": "row 0: logits at the last prompt position after prefill; "
                                       "row i>0: logits after feeding greedy_ids[i-1] as a decode step "
                                       "(position P+i-1)"},
            "prefill_logits": {"dtype": "float32", "shape": [P, config.vocab_size],
                               "meaning": "logits at every prompt position from the prefill"},
        },
        "prompt_text": prompt_text,
        "prompt_prepend_bos": prepend_bos,
        "prompt_ids": prompt_list,
        "prompt_tokens": [tok.id_to_token(i) for i in prompt_list],
        "greedy_ids": greedy_list,
        "greedy_tokens": [tok.id_to_token(i) for i in greedy_list],
        "greedy_text": greedy_text,
        "greedy_contains_special_ids": sorted({i for i in greedy_list if i in special_ids}),
        "model": {
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": head_dim,
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_position_embeddings,
            "rms_norm_eps": config.rms_norm_eps,
            "rope_parameters": rp,
            "tie_word_embeddings": config.tie_word_embeddings,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "special_token_ids": special_ids,
            "stored_tensor_dtypes": stored_dtypes,
            "num_tensors": len(header),
        },
        "max_abs_ref": {"step_logits": steps.abs().max().item(),
                        "prefill_logits": prefill.abs().max().item(),
                        "all": max_ref},
        "tolerance": {
            "rule": "max |ours - ref| <= rel * max|ref|, per tensor over all logits "
                    "(step_logits and prefill_logits); greedy_ids must match exactly",
            "rel": tol,
            "explanation": (
                "bf16->f32 conversion is exact, so an engine that upcasts the same bf16 weights and computes "
                "in f32 performs the same f32 computation as the reference; the remaining difference is f32 "
                "rounding from a different summation order (see observed_f32_vs_f64_rel). 1e-3 leaves "
                "headroom for an engine that keeps the bf16 weights in a fused bf16 x f32 kernel or rounds "
                "intermediate activations differently, as for the other bf16 cases." if bf16 else
                "f32 reference on f32 weights; an f32 engine differs only by summation order and "
                "transcendental-function rounding (see observed_f32_vs_f64_rel)."),
            "observed_f32_vs_f64_rel": f32_vs_f64,
            "f64_same_greedy_ids": f64_same_greedy,
            "cache_vs_full_forward_rel": nocache_diff / max_ref,
        },
        "min_top1_margin_rel": margin_rel,
        "top1_margins": {
            "meaning": "per row of step_logits: top-1 minus top-2 logit (abs), the same divided by max|ref| "
                       "over both tensors (rel, the quantity the random cases require to be >= "
                       f"{MIN_MARGIN_REL}), and divided by that row's own max|logit| (rel_row)",
            "abs": margins,
            "rel": [m / max_ref for m in margins],
            "rel_row": [m / r for m, r in zip(margins, row_max)],
            "min_abs": min(margins),
            "min_rel": margin_rel,
            "weakest_row": weakest_step,
            "random_case_threshold_rel": MIN_MARGIN_REL,
            "meets_random_case_threshold": margin_rel >= MIN_MARGIN_REL,
            "note": ("The prompt is fixed, not chosen for margins. Where a row's margin is below 2 * rel * "
                     "max|ref| (here " f"{2 * tol * max_ref:.4g}" "), an engine whose logits are inside the "
                     "tolerance could still pick a different greedy token at that step."),
            "rows_below_2x_tolerance": [i for i, m in enumerate(margins) if m < 2 * tol * max_ref],
        },
        "model_sha256": {f: sha256(model_dir / f) for f in
                         ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")},
        "versions": versions,
        "regenerate": f"{cmd}  (from the repository root, in the virtualenv from scripts/golden/README.md)",
        "notes": [
            "RoPE follows transformers' rotate_half convention on the HF weight layout: the head vector is "
            "split in halves [x1, x2] and rotated as (x1*cos - x2*sin, x2*cos + x1*sin), with frequency j "
            "used for both index j and j + head_dim/2 (not interleaved pairs).",
            "inv_freq = 1 / rope_theta ** (arange(0, head_dim, 2) / head_dim) computed in float32; angles = "
            "position * inv_freq in float32, then cos/sin.",
            ("tie_word_embeddings is true and model.safetensors has no lm_head.weight: the output "
             "projection is model.embed_tokens.weight." if config.tie_word_embeddings else
             "tie_word_embeddings is false and model.safetensors has its own lm_head.weight."),
            f"GQA: {config.num_attention_heads} query heads share {config.num_key_value_heads} KV heads; "
            "query head h uses KV head h // (heads / kv_heads).",
            "The logits and greedy tokens depend on the exact bytes of model.safetensors (model_sha256): "
            "regenerate after retraining or re-exporting the model.",
        ],
    }
    (out / "golden.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root (default: testdata/golden)")
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="only this case (repeatable)")
    ap.add_argument("--verify", action="store_true",
                    help="recompute from the committed model dirs and compare with the golden files")
    ap.add_argument("--model-dir", type=Path,
                    help="golden logits for this existing model directory (inside the repository) instead "
                         "of the random cases; writes only golden.safetensors and golden.json")
    ap.add_argument("--name", help="with --model-dir: output folder name (default: the model dir's name)")
    ap.add_argument("--prompt", default="Once upon a time",
                    help="with --model-dir: prompt text (default: %(default)r)")
    ap.add_argument("--no-bos", action="store_true",
                    help="with --model-dir: do not prepend config.bos_token_id to the prompt")
    ap.add_argument("--steps", type=int, default=16, help="with --model-dir: greedy steps (default: %(default)s)")
    args = ap.parse_args()
    if args.model_dir and args.case:
        ap.error("--model-dir and --case exclude each other")

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    dir_name = (args.name or args.model_dir.resolve().name) if args.model_dir else None
    names = [dir_name] if args.model_dir else (args.case or list(CASES))
    if args.verify:
        verify(args.out, names)
        return

    versions = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model_dir:
        info = make_from_dir(args.model_dir, dir_name, args.prompt, not args.no_bos, args.steps, args.out,
                             versions)
        tm = info["top1_margins"]
        print(f"{dir_name}: prompt {info['prompt_ids']}  greedy {info['greedy_ids']}")
        print(f"  greedy text {info['greedy_text']!r}")
        print(f"  max|ref| {info['max_abs_ref']['all']:.3f}  min top-1 margin {tm['min_abs']:.4f} "
              f"= {tm['min_rel']:.2e} of max|ref| (row {tm['weakest_row']}; random cases need "
              f"{MIN_MARGIN_REL})  f32-vs-f64 {info['tolerance']['observed_f32_vs_f64_rel']:.1e}")
        return
    for name in names:
        info = make_case(name, CASES[name], args.out, versions)
        print(f"{name:14s} vocab {info['model']['vocab_size']:4d}  greedy {info['greedy_ids']}  "
              f"max|ref| {info['max_abs_ref']['all']:.3f}  margin {info['min_top1_margin_rel']:.3f}  "
              f"f32-vs-f64 {info['tolerance']['observed_f32_vs_f64_rel']:.1e}")


if __name__ == "__main__":
    main()
