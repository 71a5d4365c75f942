"""Task sets: parsing, fixed subsets, requests built once, metrics."""

import json

import pytest

from optimizer.errors import MergeoptError
from optimizer.evaluate.tasks import (GenerateTask, MultipleChoiceTask, TaskSpec, load_task_set, mean_and_stderr,
                                      subset_indices, task_specs)


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


@pytest.fixture
def task_dir(tmp_path):
    write_jsonl(tmp_path / "echo.jsonl", [{"prompt": f"{i}:", "target": str(i)} for i in range(50)])
    write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "2+2=", "choices": ["3", "4", "22"], "answer": 1}] * 10)
    (tmp_path / "set.yaml").write_text(
        "seed: 3\nlimit: 20\ntasks:\n"
        "  - {name: echo, kind: generate, path: echo.jsonl, max_new_tokens: 4}\n"
        "  - {name: mc, kind: multiple_choice, path: mc.jsonl, metric: acc_norm, limit: 5}\n")
    return tmp_path


def test_task_set_yaml_builds_fixed_subsets_once(task_dir):
    first = load_task_set(task_dir / "set.yaml")
    again = load_task_set(task_dir / "set.yaml")
    assert first.names == ["echo", "mc"] and first.seed == 3
    echo, mc = first.tasks
    assert len(echo.generation) == 20 and echo.generation == again.tasks[0].generation
    assert echo.generation[0].max_new_tokens == 4
    assert len(mc.loglikelihood) == 15  # 5 items x 3 choices
    other_seed = load_task_set(task_dir / "set.yaml", seed=4)
    assert other_seed.tasks[0].generation != echo.generation
    # the CLI's --limit overrides every task's own
    assert len(load_task_set(task_dir / "set.yaml", limit=7).tasks[1].loglikelihood) == 21


def test_subset_is_deterministic_and_in_file_order():
    items = list(range(100))
    a = subset_indices(len(items), 10, seed=1)
    assert a == subset_indices(len(items), 10, seed=1) == sorted(a)
    assert subset_indices(len(items), 200, seed=1) == items


def test_subsets_are_nested_and_the_holdout_is_their_complement():
    items = list(range(100))
    small, full = subset_indices(len(items), 10, seed=3), subset_indices(len(items), 40, seed=3)
    held = subset_indices(len(items), 40, seed=3, holdout=True)
    assert set(small) < set(full)  # the low-fidelity subset lies inside the full one
    assert sorted(full + held) == items and not set(full) & set(held)
    assert subset_indices(len(items), 200, seed=3, holdout=True) == []


def test_generate_metric_normalises_and_cuts_at_stop(task_dir):
    spec = TaskSpec(name="t", path=task_dir / "echo.jsonl", stop=("\n",))
    task = GenerateTask(spec, [{"prompt": "a", "target": " 12 "}, {"prompt": "b", "target": "7"}])
    score = task.finish(["12\nignored", "8"], [])
    assert score.value == 0.5 and score.n == 2 and score.metric == "exact_match"
    assert score.stderr == pytest.approx(0.5)  # sample sd 0.707 / sqrt(2)


def test_multiple_choice_picks_the_most_likely_choice():
    spec = TaskSpec(name="mc", kind="multiple_choice")
    task = MultipleChoiceTask(spec, [{"prompt": "q", "choices": ["a", "bbbb"], "answer": 1},
                                     {"prompt": "q", "choices": ["a", "bbbb"], "answer": 0}])
    lls = [(-1.0, True), (-2.0, False), (-1.0, True), (-2.0, False)]
    assert task.finish([], lls).value == 0.5
    norm = MultipleChoiceTask(TaskSpec(name="mc", kind="multiple_choice", metric="acc_norm"), [
        {"prompt": "q", "choices": ["a", "bbbb"], "answer": 1}])
    assert norm.finish([], lls[:2]).value == 1.0  # -2/4 beats -1/1


def test_mean_and_stderr():
    assert mean_and_stderr([1.0, 0.0, 1.0, 0.0]) == (0.5, pytest.approx((1 / 3) ** 0.5 / 2))
    assert mean_and_stderr([1.0]) == (1.0, 0.0)


@pytest.mark.parametrize("body,message", [
    ("tasks: []\n", "non-empty 'tasks:'"),
    ("tasks:\n  - {name: a, kind: gen, path: x.jsonl}\n", "kind 'gen' is not one of"),
    ("tasks:\n  - {name: a, kind: generate}\n", "needs 'path'"),
    ("tasks:\n  - {name: a, path: echo.jsonl, limt: 3}\n", "unknown key 'limt'"),
    ("tasks:\n  - {name: a, path: echo.jsonl, limit: 0}\n", "limit must be a positive integer"),
    ("tasks:\n  - {name: a, path: echo.jsonl}\n  - {name: a, path: echo.jsonl}\n", "'a' appears twice"),
    ("tasks:\n  - {name: a, path: echo.jsonl, metric: f1}\n", "metric is exact_match"),
    ("taks: []\n", "non-empty 'tasks:'"),
])
def test_bad_task_sets_name_the_key(task_dir, body, message):
    path = task_dir / "bad.yaml"
    path.write_text(body)
    with pytest.raises(MergeoptError, match=message):
        load_task_set(path)


def test_bad_data_files(task_dir):
    (task_dir / "broken.jsonl").write_text('{"prompt": "a", "target": "b"}\nnot json\n')
    (task_dir / "s.yaml").write_text("tasks:\n  - {name: b, path: broken.jsonl}\n")
    with pytest.raises(MergeoptError, match=r"broken.jsonl:2: not valid JSON"):
        load_task_set(task_dir / "s.yaml")
    (task_dir / "nokey.jsonl").write_text('{"prompt": "a"}\n')
    (task_dir / "s.yaml").write_text("tasks:\n  - {name: b, path: nokey.jsonl}\n")
    with pytest.raises(MergeoptError, match="missing key 'target'"):
        load_task_set(task_dir / "s.yaml")
    (task_dir / "s.yaml").write_text("tasks:\n  - {name: b, path: nowhere.jsonl}\n")
    with pytest.raises(MergeoptError, match="does not exist"):
        load_task_set(task_dir / "s.yaml")


def test_spec_forms(task_dir):
    specs, _, _ = task_specs("arc_easy,hellaswag", limit=10)
    assert [(s.name, s.kind, s.limit) for s in specs] == [("arc_easy", "lm_eval", 10), ("hellaswag", "lm_eval", 10)]
    specs, _, _ = task_specs(task_dir / "echo.jsonl")
    assert specs[0].kind == "generate" and specs[0].name == "echo"


LM_EVAL_TASK = """task: local_copy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 5
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_yaml_task_offline(task_dir):
    pytest.importorskip("lm_eval")
    (task_dir / "lm").mkdir()
    path = task_dir / "lm" / "local_copy.yaml"
    path.write_text(LM_EVAL_TASK.format(data=task_dir / "echo.jsonl"))
    task_set = load_task_set(path, limit=8, seed=1)
    (task,) = task_set.tasks
    assert task.metric == "exact_match" and len(task.generation) == 8
    assert task.generation[0].stop == ("\n",) and task.generation[0].max_new_tokens == 5
    # answers are the prompts' numbers: a perfect model gets 1.0, an empty one 0.0
    right = [r.prompt.rstrip(":") for r in task.generation]
    assert task.finish(right, []).value == 1.0
    assert task.finish([""] * 8, []).value == 0.0
    assert task.finish(right[:4] + [""] * 4, []).value == 0.5
