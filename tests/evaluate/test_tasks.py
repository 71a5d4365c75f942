"""Task sets: parsing, fixed subsets, requests built once, metrics."""

import json

import pytest

from optimizer.errors import MergeoptError
from optimizer.evaluate.tasks import (ChatFormat, GenerateTask, GenerationRequest, LoglikelihoodRequest,
                                      MultipleChoiceTask, TaskSpec, extract_answer, load_task_set, mean_and_stderr,
                                      split_indices, subset_indices, task_specs)


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


def test_subsets_are_nested_and_three_ranges_cover_the_items():
    items = list(range(100))
    small, full = subset_indices(len(items), 10, seed=3), subset_indices(len(items), 40, seed=3)
    ranges = split_indices(len(items), 40, seed=3)
    assert set(small) < set(full) and ranges["search"] == full  # the low-fidelity subset lies inside the full one
    assert len(ranges["validation"]) == 30 and len(ranges["test"]) == 30  # half of what search leaves, each
    assert sorted(ranges["search"] + ranges["validation"] + ranges["test"]) == items
    assert subset_indices(len(items), 40, seed=3, holdout=True) == ranges["test"]
    # validation does not move when it is declared: the first items after the search range, whatever the test gets
    declared = split_indices(len(items), 40, seed=3, validation=10)
    assert set(declared["validation"]) < set(ranges["validation"]) and len(declared["test"]) == 50
    assert split_indices(len(items), 200, seed=3) == {"search": items, "validation": [], "test": []}
    assert split_indices(len(items), 40, seed=3, test_file=True)["validation"] == sorted(
        ranges["validation"] + ranges["test"])


def test_declared_ranges_a_test_file_and_empty_ranges(task_dir):
    write_jsonl(task_dir / "echo-test.jsonl", [{"prompt": f"t{i}:", "target": str(i)} for i in range(7)])
    (task_dir / "ranges.yaml").write_text(
        "limit: 20\nvalidation: 12\ntasks:\n"
        "  - {name: echo, path: echo.jsonl}\n"
        "  - {name: own, path: echo.jsonl, validation: 5, test_path: echo-test.jsonl}\n")
    sets = {split: load_task_set(task_dir / "ranges.yaml", split=split) for split in ("search", "validation", "test")}
    sizes = {split: [len(t.generation) for t in ts.tasks] for split, ts in sets.items()}
    assert sizes == {"search": [20, 20], "validation": [12, 5], "test": [18, 7]}
    prompts = {split: {r.prompt for r in ts.tasks[0].generation} for split, ts in sets.items()}
    assert not prompts["search"] & prompts["validation"] and not prompts["validation"] & prompts["test"]
    assert {r.prompt for r in sets["test"].tasks[1].generation} == {f"t{i}:" for i in range(7)}
    assert load_task_set(task_dir / "ranges.yaml", holdout=True).split == "test"
    with pytest.raises(MergeoptError, match=r"task echo: no validation items \(the search range of 50 takes 50 of "
                                            r"its 50\); lower the limit"):
        load_task_set(task_dir / "ranges.yaml", limit=50, split="validation")
    (task_dir / "bad.yaml").write_text("tasks:\n  - {name: e, path: echo.jsonl, validation: -1}\n")
    with pytest.raises(MergeoptError, match="validation must be a number of items"):
        load_task_set(task_dir / "bad.yaml")


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
    ("tasks:\n  - {name: a, path: echo.jsonl, limt: 3}\n", r"tasks\[0\]: unknown key 'limt' \(did you mean 'limit'\?\)"),
    ("tasks:\n  - {name: a, path: echo.jsonl}\nsed: 3\n", r"unknown key 'sed' \(did you mean 'seed'\?\)"),
    ("tasks:\n  - {name: a, path: echo.jsonl, stop: {x: 1}}\n", r"tasks\[0\]: stop"),
    ("tasks:\n  - {name: a, path: echo.jsonl, limit: 0}\n", "limit must be a positive integer"),
    ("tasks:\n  - {name: a, path: echo.jsonl}\n  - {name: a, path: echo.jsonl}\n", "'a' appears twice"),
    ("tasks:\n  - {name: a, path: echo.jsonl, metric: f1}\n", "metric is exact_match"),
    ("taks: []\n", "non-empty 'tasks:'"),
    ("tasks:\n  - {name: a, path: echo.jsonl, extract: last_number}\n", "extract 'last_number' is not one of"),
    ("tasks:\n  - {name: a, path: echo.jsonl, extract: regex}\n", "'pattern' .* goes with 'extract: regex'"),
    ("tasks:\n  - {name: a, path: echo.jsonl, pattern: 'x(\\d)'}\n", "'pattern' .* goes with 'extract: regex'"),
    ("tasks:\n  - {name: a, path: echo.jsonl, extract: regex, pattern: 'x(('}\n", "not a valid regular expression"),
    ("tasks:\n  - {name: a, path: echo.jsonl, system: be brief}\n", "needs 'chat: true'"),
    ("tasks:\n  - {name: a, path: echo.jsonl, chat: yes please}\n", "chat must be true or false"),
    ("tasks:\n  - {name: a, task: arc_easy, chat: true}\n", "lm-eval task formats its own prompts"),
    ("tasks:\n  - {name: a, kind: multiple_choice, path: mc.jsonl, extract: first_line}\n", "generate tasks only"),
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


@pytest.mark.parametrize("text,rule,pattern,answer", [
    ("The sum is 1,234.", "first_number", None, "1234"),
    ("-7 apples and 3 pears", "first_number", None, "-7"),
    ("3.5 then 4", "first_number", None, "3.5"),
    ("no digits here", "first_number", None, ""),
    ("\n\n  Paris\nThe capital", "first_line", None, "  Paris"),
    ("", "first_line", None, ""),
    ("I think the answer is B, not C", "regex", r"answer is ([A-D])", "B"),
    ("grade: A+", "regex", r"[A-D]\+?", "A+"),
    ("nothing", "regex", r"answer is ([A-D])", ""),
    ("C.", "regex", r"answer is ([A-D])|^([A-D])\.?$", "C"),  # the group of the alternative that matched
    (" kept as is ", "none", None, " kept as is "),
])
def test_answer_extractors(text, rule, pattern, answer):
    assert extract_answer(text, rule, pattern) == answer


def test_a_chat_answer_in_a_sentence_scores_with_extraction_and_not_without():
    items = [{"prompt": "2+2?", "target": "4"}, {"prompt": "3+4?", "target": "7"}, {"prompt": "1+1?", "target": "2"}]
    answers = ["The answer is 4.", "3 + 4 = 7", "It is 2"]
    assert GenerateTask(TaskSpec(name="t"), items).finish(answers, []).value == 0.0
    # the first number of "3 + 4 = 7" is 3: first_number scores 2/3, a regex on "= N" or "is N" all three
    assert GenerateTask(TaskSpec(name="t", extract="first_number"), items).finish(answers, []).value == pytest.approx(2 / 3)
    regex = TaskSpec(name="t", extract="regex", pattern=r"(?:is|=) (\d+)")
    assert GenerateTask(regex, items).finish(answers, []).value == 1.0
    lines = TaskSpec(name="t", extract="first_line", normalizer="alnum")
    assert GenerateTask(lines, [{"prompt": "capital?", "target": "Paris"}]).finish(["Paris.\nIt is in France"], []).value == 1.0


def test_task_yaml_carries_chat_and_extraction_into_the_requests(task_dir):
    (task_dir / "chat.yaml").write_text(
        "tasks:\n  - {name: echo, path: echo.jsonl, chat: true, system: Be brief., extract: first_number}\n"
        "  - {name: plain, path: echo.jsonl}\n"
        "  - {name: mc, kind: multiple_choice, path: mc.jsonl, chat: true}\n")
    echo, plain, mc = load_task_set(task_dir / "chat.yaml", limit=3).tasks
    assert {r.chat for r in echo.generation} == {ChatFormat("Be brief.")}
    assert echo.spec.extract == "first_number" and echo.finish(["It is 0", "1", "x"], []).n == 3
    assert {r.chat for r in plain.generation} == {None}
    assert {r.chat for r in mc.loglikelihood} == {ChatFormat(None)}


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}|"
                 "{% else %}{{ m.content }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def chat_adder(tmp_path_factory):
    """The zoo's adder with a chat template added: the user turn is the prompt itself, after <bos>."""
    import shutil

    from optimizer.zoo import zoo_models

    folder = tmp_path_factory.mktemp("chat") / "adder"
    shutil.copytree(zoo_models()["adder"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_chat_template_is_rendered_by_the_backend_without_a_second_bos(chat_adder):
    from optimizer.evaluate.hf import HFBackend
    from optimizer.evaluate.tasks import render_prompt

    backend = HFBackend(chat_adder, device="cpu")
    tok = backend.tokenizer
    text, special = render_prompt(tok, "add:12+30=", ChatFormat())
    assert text == "<bos>add:12+30=" and special is False
    assert tok(text, add_special_tokens=special)["input_ids"] == tok("add:12+30=")["input_ids"]
    assert render_prompt(tok, "add:12+30=", ChatFormat("sys"))[0] == "<bos>sys|add:12+30="
    prompts = [f"add:{a}+{b}=" for a, b in ((12, 30), (455, 21), (7, 8), (1234, 4321))]
    plain = backend.generate([GenerationRequest(p, 6) for p in prompts])
    chat = backend.generate([GenerationRequest(p, 6, chat=ChatFormat()) for p in prompts])
    assert chat == plain and sum(g == str(eval(p[4:-1])) for g, p in zip(plain, prompts)) >= 2
    # a system turn changes what the model sees, so it answers differently
    assert backend.generate([GenerationRequest(p, 6, chat=ChatFormat("sys")) for p in prompts]) != plain
    # log-likelihoods go through the same rendering
    lls = backend.loglikelihood([LoglikelihoodRequest("add:12+30=", "42"), LoglikelihoodRequest("add:12+30=", "42", ChatFormat())])
    assert lls[0] == pytest.approx(lls[1])


def test_chat_without_a_template_is_one_clear_line(tmp_path):
    from optimizer.evaluate.hf import HFBackend
    from optimizer.zoo import zoo_models

    backend = HFBackend(zoo_models()["adder"], device="cpu")
    with pytest.raises(MergeoptError, match="tokenizer has none"):
        backend.generate([GenerationRequest("add:1+1=", 3, chat=ChatFormat())])


def test_eval_show_prints_prompts_generations_and_targets(capsys, tmp_path):
    from optimizer.cli import main

    assert main(["eval", "zoo:adder", "--tasks", "zoo", "--limit", "6", "--show", "2", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    for task in ("add", "reverse", "sort"):
        assert f"== {task} (first 2 items; extract: none)" in out
    assert out.count("prompt:") == 6 and out.count("generated:") == 6 and out.count("target:") == 6
    first_add = load_task_set("zoo", limit=6).tasks[0].generation[0].prompt
    assert repr(first_add) in out
    assert main(["eval", "zoo:adder", "--tasks", "zoo", "--limit", "6", "--show", "-1"]) == 1
