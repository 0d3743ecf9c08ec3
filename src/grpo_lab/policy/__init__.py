"""Policies and their tokenizers: a tiny Llama built in code, or any ``from_pretrained`` model."""

from grpo_lab.policy.build import Policy, load_pretrained, tiny_llama
from grpo_lab.policy.tokenizer import char_tokenizer

__all__ = ["Policy", "char_tokenizer", "load_pretrained", "tiny_llama"]
