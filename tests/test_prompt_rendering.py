"""SFT, GRPO and eval render prompts identically: chat template and system prompt, or as is."""

from __future__ import annotations

import json

import pytest
import torch

from grpo_lab.evaluate import encode_prompts
from grpo_lab.module import GRPOModule
from grpo_lab.policy import tiny_llama
from grpo_lab.rewards.combine import RewardSet
from grpo_lab.sampling import KVCacheSampler
from grpo_lab.sft import demonstration_batch
from grpo_lab.tasks import ArithmeticTask, JsonlTask
from helpers import module_of

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def task(tmp_path):
    path = tmp_path / "train.jsonl"
    records = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in records))
    return JsonlTask(str(path), eval_fraction=0.2, system_prompt="Be brief.")


def module_for(policy, task) -> GRPOModule:
    return module_of(
        "G=2",
        "beta=0",
        "sampler.max_new_tokens=2",
        policy=policy,
        task=task,
        rewards=RewardSet({"zero": lambda completions, examples, **ctx: [0.0] * len(completions)}),
        sampler=KVCacheSampler(max_new_tokens=2),
    )


def _texts(tok, ids, mask) -> list[str]:
    return [tok.decode(row[m.bool()]) for row, m in zip(ids, mask)]


def test_sft_grpo_and_eval_render_the_chat_template_the_same_way(task):
    policy = tiny_llama(hidden_size=32, intermediate_size=64)
    tok = policy.tokenizer
    tok.chat_template = TEMPLATE
    examples = task.train()[:3]
    ids, mask = module_for(policy, task).encode_prompts(examples)
    grpo = _texts(tok, ids, mask)
    assert grpo == [f"<|system|>Be brief.\n<|user|>{ex.prompt}\n<|assistant|>" for ex in examples]
    enc = encode_prompts(policy, examples, task)
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"], mask)
    batch = demonstration_batch(policy, examples, system_prompt=task.system_prompt)
    for i, ex in enumerate(examples):
        prompt = batch["input_ids"][i][batch["labels"][i] == -100][: mask[i].sum()]
        assert tok.decode(prompt) == grpo[i]
        target = batch["input_ids"][i][batch["labels"][i] != -100]
        assert tok.decode(target, skip_special_tokens=True) == ex.answer


def test_use_chat_template_false_keeps_the_plain_prompt_after_the_system_prompt(task):
    policy = tiny_llama(hidden_size=32, intermediate_size=64, use_chat_template="false")
    policy.tokenizer.chat_template = TEMPLATE
    examples = task.train()[:2]
    ids, mask = module_for(policy, task).encode_prompts(examples)
    assert _texts(policy.tokenizer, ids, mask) == [f"Be brief.\n{ex.prompt}" for ex in examples]


def test_the_char_tokenizer_default_encodes_the_raw_prompt():
    policy = tiny_llama(hidden_size=32, intermediate_size=64)
    assert policy.use_chat_template == "auto" and not policy.tokenizer.chat_template
    task = ArithmeticTask(max_operand=9, eval_size=5, seed=0)
    examples = task.train()[:3]
    ids, mask = module_for(policy, task).encode_prompts(examples)
    expected = policy.tokenizer(
        [ex.prompt for ex in examples], return_tensors="pt", padding=True, add_special_tokens=False
    )
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    batch = demonstration_batch(policy, examples[:1])
    n = len(examples[0].prompt)
    assert batch["input_ids"][0, :n].tolist() == policy.tokenizer.encode(
        examples[0].prompt, add_special_tokens=False
    )
    assert (batch["labels"][0, :n] == -100).all() and batch["labels"][0, n] != -100
