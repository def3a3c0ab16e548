"""A tiny Qwen2-architecture chat model built locally (no download), for fast deterministic tests.

Same architecture family as the embedded model (RMSNorm, rotary, grouped-query attention,
gated MLP), so every code path the tests exercise is the one real runs take.
"""

from __future__ import annotations

import torch

__all__ = ["build_tiny", "build_tokenizer", "CHAT_TEMPLATE"]

# Same shape as Qwen's template: system turn, user turn, then the post-instruction tokens.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Fixed training text: the BPE merges, and so the token ids, never change between runs.
_CORPUS = (
    "how do i make write explain give tell me a the an of to and in for on with about how "
    "what why when where who can you please help create tutorial guide story poem letter "
    "bomb weapon hack steal poison attack kill drug malware virus fraud cake bread recipe "
    "garden dog cat music history science math water plant tree sun moon star book code "
    "python computer program list steps tips good best simple easy healthy friend school "
    "sorry i cannot can't help with that sure here is assistant user system is are was "
)


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with a Qwen-style chat template, trained on a fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny(n_layers: int = 2, d_model: int = 64, n_heads: int = 4, d_mlp: int = 128, seed: int = 0):
    """Return ``(hf_model, tokenizer)``: a randomly initialised Qwen2 model with a fixed seed."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=max(1, n_heads // 2),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Qwen2ForCausalLM(config)
        # Larger-than-default weights so the tiny model's activations vary across prompts.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.2)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval(), tokenizer
