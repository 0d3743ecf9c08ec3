"""task=hf: datasets written locally with ``datasets`` (save_to_disk, JSON and Parquet files),
the answer rules, the eval split and its dedup, errors; then the real CLI end to end, with the
tiny policy and with a local Qwen2 chat model (LoRA on and off)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from grpo_lab.config import validate
from grpo_lab.paths import config_dir
from grpo_lab.policy.build import load_tokenizer
from grpo_lab.tasks import Example, HfTask, render_prompts
from grpo_lab.tasks.hf import (
    answer_tag,
    gsm8k_answer,
    hold_out,
    last_boxed,
    last_number,
    normalize_answer,
    without_eval_duplicates,
)
from helpers import FAST

datasets = pytest.importorskip("datasets")


def rows(n_a: int = 6, n_b: int = 5) -> list[dict]:
    """GSM8K-shaped rows: a question, a worked answer ending "#### N", an R1-form solution."""
    return [
        {
            "question": f"What is {a} plus {b}?",
            "answer": f"{a}+{b}={a + b}\n#### {a + b}",
            "solution": f"<think>{a}+{b}</think><answer>\\boxed{{{a + b}}}</answer>",
        }
        for a in range(n_a)
        for b in range(n_b)
    ]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """load_dataset's Arrow cache in the test's directory, not in ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same 30 rows (plus one duplicate question) three ways: a save_to_disk directory, a
    JSON Lines file and a Parquet file; and a DatasetDict with its own test split."""
    root = tmp_path_factory.mktemp("hf-data")
    records = rows()
    records.append({**records[3], "answer": "again\n#### 3"})  # a second row with a prompt of 3
    ds = datasets.Dataset.from_list(records)
    ds.save_to_disk(str(root / "disk"))
    ds.to_json(str(root / "data.jsonl"))
    ds.to_parquet(str(root / "data.parquet"))
    test = datasets.Dataset.from_list(
        [{"question": "What is  0 plus\t1?", "answer": "#### 1", "solution": "x"}]
        + [
            {"question": f"What is {a} times 2?", "answer": f"#### {2 * a}", "solution": "x"}
            for a in range(4)
        ]
    )
    datasets.DatasetDict({"train": ds, "test": test}).save_to_disk(str(root / "dict"))
    return root


# ---------------------------------------------------------------- the answer rules


@pytest.mark.parametrize(
    "text, gold",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("a #### 5 then #### -3 ", "-3"),  # the last ####
        ("#### 0.5", "0.5"),
        ("no marker 42", None),
        ("####   ", None),
    ],
)
def test_gsm8k_extraction_takes_the_text_after_the_last_marker_without_commas(text, gold):
    assert gsm8k_answer(text) == gold


@pytest.mark.parametrize(
    "text, boxed",
    [
        (r"so \boxed{42}", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
        (r"\boxed{{a}{b}{c}}", "{a}{b}{c}"),
        (r"first \boxed{1}, then \boxed{2}.", "2"),  # several: the last
        (r"\boxed{ 7 }", "7"),
        (r"\boxed{1} and an unclosed \boxed{\frac{1}{2}", None),  # the last never closes
        (r"\boxed 5", None),
        ("no box", None),
        (r"\boxed{}", ""),
    ],
)
def test_last_boxed_balances_braces_and_takes_the_last(text, boxed):
    assert last_boxed(text) == boxed


def test_last_boxed_is_linear_on_deep_nesting():
    import time

    text = r"\boxed{" + "{" * 200_000 + "}" * 200_000 + "}"
    t0 = time.perf_counter()
    assert last_boxed(text) == "{" * 200_000 + "}" * 200_000
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    "text, answer",
    [
        ("<think>x</think><answer> 12 </answer>", "12"),
        ("<answer>1</answer> no, <answer>\n2\n</answer>", "2"),
        ("<answer>1", None),
        ("<ANSWER>1</ANSWER>", None),
        ("<answer>1<answer>2</answer>", "2"),  # the opening tag nearest the last closing one
        ("</answer><answer>", None),
    ],
)
def test_answer_tag_takes_the_last_closed_tag(text, answer):
    assert answer_tag(text) == answer


@pytest.mark.parametrize(
    "text, number",
    [
        ("it costs $1,234.50 in total.", "1234.50"),
        ("-3 or 4", "4"),
        ("3,4", "4"),  # not a thousands group: two numbers
        ("none", None),
    ],
)
def test_last_number_reads_thousands_commas(text, number):
    assert last_number(text) == number


@pytest.mark.parametrize(
    "a, b, same",
    [
        ("72", "72.0", True),
        ("$1,234", "1234", True),
        ("72.", "72", True),
        ("-0", "0", True),
        ("-0.00", "0", True),
        ("1e3", "1000", False),  # scientific notation is text here
        ("0.50", ".5", True),
        ("72", "27", False),
        (r"\frac{1}{2}", r"\frac{1}{2}", True),
        (r"\frac{1}{2}", "0.5", False),  # no algebra: reward=math_verify does that
        ("9" * 100, "9" * 100, True),  # no arithmetic on huge numbers, same text
    ],
)
def test_answers_compare_in_normal_form(a, b, same):
    assert (normalize_answer(a) == normalize_answer(b)) is same


def test_is_correct_parses_by_answer_format(data):
    ex = Example(prompt="q", answer="1234")
    boxed = HfTask(str(data / "disk"), answer_extraction="gsm8k")
    assert boxed.is_correct(r"<think>..</think><answer>\boxed{1,234}</answer>", ex)
    assert not boxed.is_correct("<answer>1234</answer>", ex)
    tag = HfTask(str(data / "disk"), answer_extraction="gsm8k", answer_format="answer_tag")
    assert tag.is_correct("<answer> 1234 </answer>", ex)
    regex = HfTask(str(data / "disk"), answer_extraction="gsm8k", answer_format=r"ANS=(\d+)")
    assert regex.parse_answer("ANS=1 ANS=1234") == "1234" and regex.is_correct("ANS=1234", ex)


# ---------------------------------------------------------------- splits


def test_hold_out_is_seeded_and_keeps_no_eval_duplicate_in_train(data):
    task = HfTask(str(data / "disk"), answer_extraction="gsm8k", eval_fraction=0.2, seed=0)
    again = HfTask(str(data / "disk"), answer_extraction="gsm8k", eval_fraction=0.2, seed=0)
    other = HfTask(str(data / "disk"), answer_extraction="gsm8k", eval_fraction=0.2, seed=1)
    prompts = lambda exs: [e.prompt for e in exs]  # noqa: E731
    assert prompts(task.eval()) == prompts(again.eval()) and prompts(task.train()) == prompts(
        again.train()
    )
    assert prompts(task.eval()) != prompts(other.eval())
    assert len(task.eval()) == 7  # ceil(0.2 * 31)
    assert task.eval_split is None
    # "What is 0 plus 3?" is in the data twice; with any seed no eval prompt stays in train
    for seed in range(8):
        t = HfTask(str(data / "disk"), answer_extraction="gsm8k", eval_fraction=0.2, seed=seed)
        assert not set(prompts(t.train())) & set(prompts(t.eval()))
        assert len(t.train()) + len(t.eval()) + t.duplicates_removed == 31
    # the seeds whose hold-out split the pair drop exactly one training row
    split = [
        s
        for s in range(8)
        if HfTask(
            str(data / "disk"), answer_extraction="gsm8k", eval_fraction=0.2, seed=s
        ).duplicates_removed
    ]
    assert split, "no seed split the duplicate pair: the dedup went untested"


def test_dedup_normalises_whitespace():
    train = ["What is 1 plus 2?", "What  is 1\nplus 2? ", "What is 2 plus 2?"]
    assert without_eval_duplicates(train, [" What is 1 plus 2?"]) == [2]
    assert hold_out(10, 0.3, seed=4) == hold_out(10, 0.3, seed=4)
    tr, ev = hold_out(10, 0.3, seed=4)
    assert len(ev) == 3 and sorted(tr + ev) == list(range(10))


def test_the_datasets_own_test_split_is_the_eval_split(data):
    task = HfTask(str(data / "dict"), answer_extraction="gsm8k")
    assert task.eval_split == "test"
    assert [e.prompt for e in task.eval()][1:] == [f"What is {a} times 2?" for a in range(4)]
    assert [e.answer for e in task.eval()] == ["1", "0", "2", "4", "6"]
    # its "What is  0 plus\t1?" is "What is 0 plus 1?" once whitespace is normalised: dropped
    assert task.duplicates_removed == 1 and len(task.train()) == 30
    assert "What is 0 plus 1?" not in {e.prompt for e in task.train()}
    # eval_split=null holds out of the train split instead
    held = HfTask(str(data / "dict"), answer_extraction="gsm8k", eval_split=None)
    assert held.eval_split is None and "times" not in " ".join(e.prompt for e in held.eval())


def test_a_hold_out_in_place_of_a_missing_test_split_is_said_when_there_is_another_split(
    tmp_path, caplog
):
    """A dataset with train and validation but no test: eval_split=test falls back to a
    hold-out of train, and the log says so and names the split a researcher may have meant."""
    ds = datasets.Dataset.from_list(rows())
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(3))}).save_to_disk(
        str(tmp_path / "tv")
    )
    with caplog.at_level("WARNING", logger="grpo_lab.tasks.hf"):
        task = HfTask(str(tmp_path / "tv"), answer_extraction="gsm8k")
    assert task.eval_split is None
    assert "task.eval_split=validation" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="grpo_lab.tasks.hf"):
        HfTask(str(tmp_path / "tv"), answer_extraction="gsm8k", eval_split=None)  # asked for
    assert not caplog.text


def test_json_and_parquet_files_load_through_load_dataset_like_the_saved_directory(data):
    kw = dict(answer_extraction="gsm8k", demonstration_field="solution", seed=3)
    disk = HfTask(str(data / "disk"), **kw)
    for builder, name in [("json", "data.jsonl"), ("parquet", "data.parquet")]:
        task = HfTask(builder, data_files=str(data / name), **kw)
        assert task.train() == disk.train() and task.eval() == disk.eval()
        assert task.dataset_name == name and task.source["data_files"] == str(data / name)
    ex = disk.train()[0]
    a, b = (int(x) for x in ex.prompt.removeprefix("What is ").removesuffix("?").split(" plus "))
    assert ex.answer == str(a + b)
    assert ex.target == f"<think>{a}+{b}</think><answer>\\boxed{{{a + b}}}</answer>"


def test_data_files_per_split_from_the_command_line_give_the_own_test_split(data, tmp_path):
    from omegaconf import OmegaConf

    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"question": "What is 9 plus 9?", "answer": "#### 18"}) + "\n")
    # as Hydra passes task.data_files={train:...,test:...}: a DictConfig
    files = OmegaConf.create({"train": str(data / "data.jsonl"), "test": str(test)})
    task = HfTask("json", data_files=files, answer_extraction="gsm8k")
    assert task.eval_split == "test" and task.eval() == [Example("What is 9 plus 9?", "18")]
    assert len(task.train()) == 31 and task.dataset_name == "data.jsonl"


def test_max_examples_reads_the_first_rows_of_each_split(data):
    task = HfTask(str(data / "dict"), answer_extraction="gsm8k", max_examples=3)
    assert [e.prompt for e in task.train()] == [f"What is 0 plus {b}?" for b in (0, 2)]
    assert len(task.eval()) == 3 and task.duplicates_removed == 1


# ---------------------------------------------------------------- errors before compute


def test_a_missing_field_names_the_key_the_value_and_the_columns(data):
    with pytest.raises(
        ValueError,
        match=r"task.prompt_field='prompt' is not a column of .*disk split 'train'; "
        r"columns: \['question', 'answer', 'solution'\]",
    ):
        HfTask(str(data / "disk"), prompt_field="prompt")
    with pytest.raises(ValueError, match=r"task.demonstration_field='demo' is not a column"):
        HfTask(str(data / "disk"), demonstration_field="demo")


def test_bad_rules_splits_and_paths_fail_with_what_is_allowed(data):
    with pytest.raises(
        ValueError,
        match=r"task.answer_format='boxd' is invalid; allowed: boxed, answer_tag, last_number or a regex",
    ):
        HfTask(str(data / "disk"), answer_format="boxd")
    with pytest.raises(ValueError, match=r"task.answer_extraction='\(' is not a valid regex"):
        HfTask(str(data / "disk"), answer_extraction="(")
    with pytest.raises(
        ValueError,
        match=r"task.split='validation' is not a split of .*; splits: \['test', 'train'\]",
    ):
        HfTask(str(data / "dict"), split="validation")
    with pytest.raises(ValueError, match=r"task.eval_split='valid' is not a split"):
        HfTask(str(data / "dict"), eval_split="valid")
    with pytest.raises(
        ValueError,
        match=r"dict split 'train' row 0: task.answer_extraction='gsm8k' finds no answer in "
        r"task.answer_field='solution': '<think>0\+0</think>",
    ):
        HfTask(
            str(data / "dict"),
            answer_extraction="gsm8k",
            prompt_field="solution",
            answer_field="solution",
        )
    with pytest.raises(
        ValueError,
        match=r"is a file; give the builder and the file: task.path=json task.data_files=",
    ):
        HfTask(str(data / "data.jsonl"))


def test_a_conversation_column_is_refused_as_a_prompt(tmp_path):
    datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": "hi"}], "answer": "1"}] * 4
    ).save_to_disk(str(tmp_path / "conv"))
    with pytest.raises(
        ValueError,
        match=r"task.prompt_field='prompt' of .*conv split 'train' holds List values, not text",
    ):
        HfTask(str(tmp_path / "conv"), prompt_field="prompt")


def test_without_datasets_the_error_names_the_extra(data, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` meets when absent
    with pytest.raises(
        ImportError, match=r"task=hf needs the datasets package: pip install 'grpo-lab\[hf\]'"
    ):
        HfTask(str(data / "disk"))


def test_hf_and_gsm8k_compose_and_validate():
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        gsm = compose("config", overrides=["task=gsm8k", "reward=[accuracy,r1_format]"])
        hf = compose("config", overrides=["task=hf", "task.path=json", "task.max_examples=0"])
    validate(gsm)
    assert gsm.task._target_ == "grpo_lab.tasks.HfTask"
    assert (gsm.task.path, gsm.task.name, gsm.task.answer_extraction) == (
        "openai/gsm8k",
        "main",
        "gsm8k",
    )
    assert (gsm.task.prompt_field, gsm.task.answer_field, gsm.task.eval_split) == (
        "question",
        "answer",
        "test",
    )
    assert r"\boxed{}" in gsm.task.system_prompt and "<think>" in gsm.task.system_prompt
    assert set(gsm.reward.functions) == {"accuracy", "r1_format"}
    from grpo_lab.config import ConfigError

    with pytest.raises(ConfigError, match="task.max_examples=0"):
        validate(hf)


# ---------------------------------------------------------------- the real CLI


def hf_overrides(path: str, *extra: str) -> list[str]:
    """FAST's run (2 rollouts, SFT on) with task=hf on a local dataset instead of arithmetic."""
    return [
        *(o for o in FAST if not o.startswith("task.")),
        "task=hf",
        f"task.path={path}",
        "task.answer_extraction=gsm8k",
        "task.eval_fraction=0.2",
        "sampler.max_new_tokens=8",
        "num_threads=1",
        *extra,
    ]


def only_run(tracking_uri):
    client = MlflowClient(tracking_uri=tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("grpo_lab").experiment_id])
    return client, run


def dataset_inputs(run) -> dict[str, tuple[str, str]]:
    return {
        next(t.value for t in di.tags if t.key == "mlflow.data.context"): (
            di.dataset.name,
            di.dataset.digest,
        )
        for di in run.inputs.dataset_inputs
    }


def completion_table(client, run) -> dict:
    path = client.download_artifacts(run.info.run_id, "completions/rollout_00001.json")
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
def test_a_save_to_disk_dataset_trains_end_to_end_and_is_on_the_run(
    run_cli, tracking_uri, data, tmp_path
):
    import mlflow.data

    run_cli(
        "train",
        *hf_overrides(str(data / "disk"), "task.demonstration_field=solution"),
        env={"HF_DATASETS_CACHE": str(tmp_path / "hf-cache")},
    )
    client, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert m["rollout"] == 2 and "eval/accuracy_final" in m and "rewards/accuracy/mean" in m
    # the rows the task trains and scores on, digested by MLflow from the task built here
    task = HfTask(
        str(data / "disk"),
        answer_extraction="gsm8k",
        eval_fraction=0.2,
        demonstration_field="solution",
    )
    assert len(task.eval_dataset) == 7  # ceil(0.2 * 31), under FAST's train.eval_size=8: all
    assert dataset_inputs(run) == {
        "training": ("disk/train", mlflow.data.from_huggingface(task.train_dataset).digest),
        "evaluation": (
            "disk/train-heldout",
            mlflow.data.from_huggingface(task.eval_dataset).digest,
        ),
    }
    (train_input,) = [di for di in run.inputs.dataset_inputs if di.dataset.name == "disk/train"]
    assert train_input.dataset.source_type == "local"
    assert json.loads(train_input.dataset.source) == {"uri": str(data / "disk")}
    table = completion_table(client, run)
    prompts = [row[table["columns"].index("prompt")] for row in table["data"]]
    assert set(prompts) <= {e.prompt for e in task.train()}


@pytest.mark.slow
def test_a_json_file_trains_end_to_end_through_load_dataset(run_cli, tracking_uri, data, tmp_path):
    run_cli(
        "train",
        *hf_overrides(
            "json",
            f"task.data_files={data / 'data.jsonl'}",
            "reward=[accuracy,r1_format]",
            "task.answer_format=answer_tag",
        ),
        env={"HF_DATASETS_CACHE": str(tmp_path / "hf-cache")},
    )
    _, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED" and "rewards/r1_format/mean" in run.data.metrics
    inputs = {di.dataset.name: di.dataset for di in run.inputs.dataset_inputs}
    assert set(inputs) == {"data.jsonl/train", "data.jsonl/train-heldout"}
    source = json.loads(inputs["data.jsonl/train"].source)
    assert inputs["data.jsonl/train"].source_type == "hugging_face"
    assert source["path"] == "json" and source["data_files"] == str(data / "data.jsonl")


SYSTEM = "Answer with <think> reasoning </think><answer> \\boxed{} </answer>."


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_local_qwen2_chat_model_trains_through_its_chat_template(
    run_cli, tracking_uri, data, chat_model_dir, tmp_path, lora
):
    """policy=pretrained with a real chat template: SFT, 2 GRPO rollouts and eval run, and the
    prompts the policy was given are the template's rendering with the system prompt."""
    overrides = [
        o for o in hf_overrides(str(data / "disk")) if not o.startswith(("policy.", "sampler."))
    ]
    lora_args = (
        ["policy.lora.enabled=true", "policy.lora.target_modules=[q_proj,v_proj,gate_proj]"]
        if lora
        else []
    )
    run_cli(
        "train",
        *overrides,
        "policy=pretrained",
        f"policy.name_or_path={chat_model_dir}",
        f"task.system_prompt='{SYSTEM}'",
        "sampler.max_new_tokens=12",
        *lora_args,
        env={"HF_DATASETS_CACHE": str(tmp_path / "hf-cache")},
    )
    client, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["policy.lora.enabled"] == str(lora)
    assert {"eval/accuracy_start", "eval/accuracy_final", "reward", "loss"} <= set(run.data.metrics)
    assert run.data.metrics["rollout"] == 2
    tokenizer = load_tokenizer(str(chat_model_dir))
    table = completion_table(client, run)
    col = table["columns"].index
    for row in table["data"]:
        (expected,) = render_prompts(tokenizer, [row[col("prompt")]], system_prompt=SYSTEM)
        assert row[col("rendered_prompt")] == expected
        assert expected == (
            f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{row[col('prompt')]}"
            "<|im_end|>\n<|im_start|>assistant\n"
        )
    # LoRA: the checkpoint holds adapters on exactly the named modules; without: none
    (ckpt,) = tmp_path.glob("outputs/*/*/checkpoints/last.ckpt")
    keys = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"].keys()
    adapted = {k.split(".lora_A")[0].rsplit(".", 1)[-1] for k in keys if ".lora_A" in k}
    assert adapted == ({"q_proj", "v_proj", "gate_proj"} if lora else set())


@pytest.mark.slow
def test_a_bad_field_on_the_command_line_is_a_usage_error_before_any_training(run_cli, data):
    proc = run_cli(
        "train", *hf_overrides(str(data / "disk"), "task.prompt_field=problem"), check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "task.prompt_field='problem' is not a column of" in proc.stderr
    assert "columns: ['question', 'answer', 'solution']" in proc.stderr
    assert "Traceback" not in proc.stderr and "sft step" not in proc.stdout + proc.stderr


def test_the_sft_warm_start_is_not_reused_when_the_data_behind_the_same_path_changed(tmp_path):
    """The warm start's cache key holds the training data, not only task.path: a file or
    save_to_disk directory rewritten in place (or a hub dataset at a new revision) trains a new
    warm start instead of reusing one fitted to the old demonstrations."""
    from grpo_lab.instantiate import instantiate
    from grpo_lab.train import build_policy

    path = tmp_path / "data.jsonl"
    overrides = [
        *(o for o in FAST if not o.startswith(("task.", "sft."))),
        "task=hf",
        "task.path=json",
        f"task.data_files={path}",
        "task.answer_extraction=gsm8k",
        "task.eval_fraction=0.2",
        "sft.steps=1",
        "sft.batch_size=2",
        f"sft.cache_dir={tmp_path / 'sft'}",
    ]
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    warm = []
    for n_a in (6, 7):  # the same path, other rows
        datasets.Dataset.from_list(rows(n_a=n_a)).to_json(str(path))
        _, sft_path = build_policy(cfg, instantiate(cfg.task))
        warm.append(sft_path)
    assert warm[0] != warm[1]
    _, again = build_policy(cfg, instantiate(cfg.task))  # the same data: the cache is reused
    assert again == warm[1]
