"""Rewards computed by a model: embedding similarity to the answer, and a reward model.

Both load with transformers from a local directory or a hub id (``local_files_only`` keeps
them offline) once, when the reward is built, and score without gradients.

A fast tokenizer encodes the whole text before it truncates to ``max_length`` tokens, so a
completion of a million characters costs seconds however short ``max_length`` is. Texts are cut
to ``(max_length + 1) * MAX_CHARS_PER_TOKEN`` characters first (on the side the tokenizer
truncates): that keeps the same first ``max_length`` tokens for any tokenizer whose tokens span at
most that many characters (WordPiece's [UNK] for a word over 100 characters spans more).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from grpo_lab.policy.build import load_tokenizer as load_policy_tokenizer
from grpo_lab.tasks.base import Example

MAX_CHARS_PER_TOKEN = 64


def load_tokenizer(name_or_path: str, local_files_only: bool = False) -> PreTrainedTokenizerBase:
    """The policy loader's tokenizer (generic fast tokenizers kept as such), padding on the right."""
    tok = load_policy_tokenizer(name_or_path, local_files_only=local_files_only)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    # Right padding keeps absolute positions (BERT) and a first-token [CLS] where the scorer
    # expects them; a saved policy tokenizer may carry left padding for generation.
    tok.padding_side = "right"
    return tok


def bounded_texts(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[str]:
    """Texts cut to what ``max_length`` tokens can cover, and made encodable as UTF-8."""
    limit = (max_length + 1) * MAX_CHARS_PER_TOKEN
    left = getattr(tokenizer, "truncation_side", "right") == "left"
    # A lone surrogate ("\ud800") is a valid Python str but not UTF-8: fast tokenizers raise.
    return [
        (t[-limit:] if left else t[:limit]).encode("utf-8", "replace").decode("utf-8")
        for t in texts
    ]


def _check_path(key: str, name_or_path: str) -> None:
    if name_or_path in (None, "", "???"):
        raise ValueError(f"{key}={name_or_path!r}: give a local model directory or a hub id")
    if name_or_path.startswith((".", "/")) and not Path(name_or_path).is_dir():
        raise FileNotFoundError(f"{key}={name_or_path!r} is not a directory")


class EmbeddingSimilarity:
    """cos(e(completion), e(answer)), e = mean of the last hidden states over real tokens.

    model: a sentence-embedding model (transformers ``AutoModel``), directory or hub id.
    Completions that are empty after stripping score None (no embedding to compare).
    """

    def __init__(
        self,
        model: str,
        max_length: int = 256,
        batch_size: int = 64,
        local_files_only: bool = False,
    ) -> None:
        from transformers import AutoModel

        _check_path("reward.functions.<name>.model", model)
        self.tokenizer = load_tokenizer(model, local_files_only)
        self.model = AutoModel.from_pretrained(model, local_files_only=local_files_only).eval()
        self.max_length, self.batch_size = max_length, batch_size

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), hidden) mean-pooled embeddings."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                bounded_texts(texts[i : i + self.batch_size], self.tokenizer, self.max_length),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            )
            hidden = self.model(**enc).last_hidden_state  # (b, T, H)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
        return torch.cat(out)

    def __call__(
        self, completions: list[str], examples: list[Example], **_: Any
    ) -> list[float | None]:
        keep = [i for i, c in enumerate(completions) if c.strip()]
        scores: list[float | None] = [None] * len(completions)
        if not keep:
            return scores
        answers = sorted({examples[i].answer for i in keep})
        ref = dict(zip(answers, self.embed(answers)))
        comp = self.embed([completions[i] for i in keep])
        for row, i in enumerate(keep):
            sim = torch.nn.functional.cosine_similarity(comp[row], ref[examples[i].answer], dim=0)
            scores[i] = float(sim)
        return scores


class RewardModel:
    """The score of a sequence classifier with one output (``num_labels=1``) on prompt + completion.

    model: any ``AutoModelForSequenceClassification`` directory or hub id.
    """

    def __init__(
        self,
        model: str,
        max_length: int = 512,
        batch_size: int = 32,
        local_files_only: bool = False,
    ) -> None:
        from transformers import AutoModelForSequenceClassification

        _check_path("reward.functions.<name>.model", model)
        self.tokenizer = load_tokenizer(model, local_files_only)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model, local_files_only=local_files_only
        ).eval()
        n = self.model.config.num_labels
        if n != 1:
            raise ValueError(
                f"reward model {model!r} has num_labels={n}; allowed: 1 (a scalar score per sequence)"
            )
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length, self.batch_size = max_length, batch_size

    @torch.no_grad()
    def __call__(self, completions: list[str], examples: list[Example], **_: Any) -> list[float]:
        texts = [ex.prompt + c for c, ex in zip(completions, examples, strict=True)]
        scores: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                bounded_texts(texts[i : i + self.batch_size], self.tokenizer, self.max_length),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            )
            scores.extend(self.model(**enc).logits[:, 0].float().tolist())
        return scores
