"""A tiny, randomly initialised chat model built offline in about a second.

``tiny_model_dir`` is a directory that ``generation.model`` can name: a 2-layer Llama with
a byte-level BPE tokenizer trained in memory on a few sentences, a ChatML chat template,
and ``<|im_end|>`` as end of turn. Its weights are seeded, so greedy output is the same on
every run; it speaks gibberish, which is all the generation tests need.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Hello, who are you? I am a small test model and I say odd things.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Customers ask about orders, refunds, delivery times and opening hours.",
    "Ça va? Très bien, merci! Grüße aus München. 你好世界 🙂👍",
    "Numbers like 12, 345 and 6789 appear in tickets, invoices and replies.",
]


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    """Write a tiny seeded Llama chat model with its tokenizer to ``path``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        # Wide initial weights give peaked logits, so greedy choices are not near-ties.
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the tiny model, built once per test session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
