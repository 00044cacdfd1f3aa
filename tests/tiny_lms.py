"""Tiny decoder-only language models built from configs (random weights), and a
word-level tokenizer trained offline with ``tokenizers``, for the language-model tests.

Nothing is downloaded: each builder makes a model of its family (Hugging Face GPT-2,
GPT-NeoX / Pythia, Llama, TransformerLens ``HookedTransformer``) with two blocks and a
16-wide residual stream over the tokenizer's vocabulary. The Hugging Face models are
left with their default attention implementation (SDPA), as a user would have them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

#: The words the tokenizer knows (one token each), besides its special tokens.
WORDS = (
    "the cat dog bird sat ran flew on in a mat park sky city capital of is "
    "Paris Rome Berlin Madrid Oslo Vienna lives works and to"
).split()
SPECIAL_TOKENS = ("[UNK]", "[PAD]", "[EOS]")
HIDDEN = 16
LAYERS = 2
CONTEXT = 64


def word_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per word of :data:`WORDS`,
    trained offline (whitespace pre-tokenizer, word-level model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS))
    tokenizer.train_from_iterator([" ".join(WORDS)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token="[EOS]",
    )


VOCAB = len(WORDS) + len(SPECIAL_TOKENS)


def _quietly(build: Callable[[], nn.Module]) -> nn.Module:
    # config checks warn about token ids of the full-size vocabularies
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """Hugging Face ``GPT2LMHeadModel``: 2 blocks, width 16, eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=CONTEXT,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=2,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )
    return _quietly(lambda: GPT2LMHeadModel(config)).eval()


def tiny_neox(seed: int = 0) -> nn.Module:
    """Hugging Face ``GPTNeoXForCausalLM`` (the Pythia family): 2 blocks, width 16."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=CONTEXT,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )
    return _quietly(lambda: GPTNeoXForCausalLM(config)).eval()


def tiny_llama(seed: int = 0) -> nn.Module:
    """Hugging Face ``LlamaForCausalLM``: 2 blocks, width 16, grouped-query
    attention (2 heads, 1 key-value head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        max_position_embeddings=CONTEXT,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )
    return _quietly(lambda: LlamaForCausalLM(config)).eval()


def tiny_hooked_transformer(seed: int = 0) -> nn.Module:
    """TransformerLens ``HookedTransformer``: 2 blocks, width 16, LayerNorm."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config = HookedTransformerConfig(
        n_layers=LAYERS,
        d_model=HIDDEN,
        n_ctx=CONTEXT,
        d_head=8,
        n_heads=2,
        d_vocab=VOCAB,
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
    )
    return _quietly(lambda: HookedTransformer(config)).eval()


#: Every family, by name, for parametrised tests.
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "gpt2": tiny_gpt2,
    "gpt_neox": tiny_neox,
    "llama": tiny_llama,
    "hooked_transformer": tiny_hooked_transformer,
}
