"""A frozen LLM and its tokenizer, by the value of a setting: a Hugging Face directory, a registry
LLM's name, or the embedded default."""
from __future__ import annotations

from pathlib import Path

from vlfast import defaults
from vlfast.models.vlm import LLM_DTYPES, check_tokenizer


def load_llm(value: str, option: str, default: str, dtype: str = "fp32"):
    """(frozen LLM in `dtype`, tokenizer) from a Hugging Face directory (a causal LM, or an
    encoder-decoder LM such as FlanT5), a registry LLM by name (vlfast.defaults.REGISTRY_LLMS), or
    the embedded default's LM named `default` when value is 'default'; `option` names the setting
    in errors."""
    torch_dtype = LLM_DTYPES[dtype]
    if value == defaults.DEFAULT:
        # Loaded in the dtype like any directory's LLM (a cast afterwards would also cast its buffers).
        return defaults.default_lm(default, dtype=torch_dtype), defaults.shapes_tokenizer()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    flag = "--" + option.replace("_", "-")
    try:
        path = defaults.registry_llm(value) if value in defaults.REGISTRY_LLMS else Path(value)
    except (ImportError, FileNotFoundError) as error:  # a registry LLM's package or its GGUF reader is missing
        raise ValueError(f"{flag} {value}: {error}") from error
    if not path.is_dir():
        raise FileNotFoundError(f"{flag} {value}: no such directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{flag} {value}: no tokenizer that loads there ({error})") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    auto = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(path).is_encoder_decoder else AutoModelForCausalLM
    llm = auto.from_pretrained(path, dtype=torch_dtype).eval().requires_grad_(False)
    try:
        check_tokenizer(tokenizer, llm)
    except ValueError as error:
        raise ValueError(f"{flag} {value}: {error}") from error
    return llm, tokenizer
