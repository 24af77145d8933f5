"""Tokenizer loading with a pad token that is never the EOS token, and chat rendering."""

from __future__ import annotations

import logging
import os

from atlas_jax.config import ModelConfig

log = logging.getLogger(__name__)

BUILTIN_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tokenizer")
# existing tokens worth reusing as padding before adding a new one (Llama 3.1+, Qwen, Llama 3)
_PAD_CANDIDATES = ("<|pad|>", "<|finetune_right_pad_id|>", "<|endoftext|>", "<|reserved_special_token_0|>")


def load_tokenizer(cfg: ModelConfig):
    """cfg.tokenizer, else the model's directory, else the built-in tokenizer."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.model_name_or_path or BUILTIN_TOKENIZER
    if source == BUILTIN_TOKENIZER and not os.path.isdir(source):
        raise FileNotFoundError(f"built-in tokenizer {source} is missing: set model.tokenizer=PATH")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as error:  # offline hub, unknown id, a directory without tokenizer files
        from atlas_jax.models.hf import ModelLoadError  # hf imports the decoder; keep this module light

        where = "model.tokenizer" if cfg.tokenizer else "model.model_name_or_path"
        raise ModelLoadError(f"{where}={source!r}: no tokenizer could be loaded ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''}); offline, pass a local "
                             "directory with tokenizer files") from None
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer) -> None:
    """Pads must differ from EOS, or masking pads would also hide the end of each answer."""
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return
    vocab = tokenizer.get_vocab()
    for token in _PAD_CANDIDATES:
        if token in vocab and vocab[token] != eos:
            tokenizer.pad_token = token
            return
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    log.warning("tokenizer had no usable pad token; added <|pad|> as id %d (check the model's vocab size)",
                tokenizer.pad_token_id)


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    """Messages [{role, content}] -> prompt text through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat_template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
