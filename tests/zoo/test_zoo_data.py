"""Task generators: deterministic across processes, held-out split disjoint from every training stream."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

from optimizer.zoo import data, zoo_tasks

_DUMP = (
    "import itertools, json\n"
    "from optimizer.zoo import data\n"
    "items = {s: data.eval_items(s, 20) for s in data.SKILLS}\n"
    "stream = list(itertools.islice(data.training_stream(data.PRETRAIN_MIXTURE, seed=7), 50))\n"
    "print(json.dumps({'eval': items, 'train': stream}))\n"
)


def _dump_in_subprocess(hash_seed: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _DUMP], env=env, cwd=root, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_generators_are_deterministic_across_processes():
    first, second = _dump_in_subprocess("1"), _dump_in_subprocess("2")
    assert first == second
    here = {s: data.eval_items(s, 20) for s in data.SKILLS}
    assert first["eval"] == here
    assert [tuple(pair) for pair in first["train"]] == list(
        itertools.islice(data.training_stream(data.PRETRAIN_MIXTURE, seed=7), 50)
    )


def test_different_seeds_give_different_items():
    a = list(itertools.islice(data.training_stream(data.PRETRAIN_MIXTURE, seed=1), 20))
    b = list(itertools.islice(data.training_stream(data.PRETRAIN_MIXTURE, seed=2), 20))
    assert a != b


def test_targets_are_correct():
    for skill in data.SKILLS:
        for item in data.eval_items(skill, 50):
            body = item["prompt"][len(data.PROMPT_PREFIX[skill]) : -1]
            assert item["prompt"].endswith("=")
            if skill == "add":
                a, b = body.split("+")
                assert item["target"] == str(int(a) + int(b))
            elif skill == "reverse":
                assert item["target"] == body[::-1]
            else:
                assert item["target"] == "".join(sorted(body))


def test_heldout_split_is_disjoint_from_training_streams():
    heldout = data.heldout_prompts()
    assert len(heldout) == 3 * data.EVAL_SIZE
    mixtures = [data.PRETRAIN_MIXTURE] + [data.specialist_mixture(s) for s in data.SKILLS]
    for seed, mixture in enumerate(mixtures):
        stream = data.training_stream(mixture, seed=seed, exclude=heldout)
        drawn = list(itertools.islice(stream, 4000))
        assert not heldout & {prompt for prompt, _ in drawn}
    # The filter really filters: exclude what an unfiltered stream draws first, and the same stream skips it.
    first = {prompt for prompt, _ in itertools.islice(data.training_stream(data.PRETRAIN_MIXTURE, seed=5), 100)}
    filtered = data.training_stream(data.PRETRAIN_MIXTURE, seed=5, exclude=first)
    assert not first & {prompt for prompt, _ in itertools.islice(filtered, 500)}


def test_shipped_task_files_match_the_generator_and_skip_every_trained_prompt():
    from optimizer.builders.tiny import trained_prompts

    trained = trained_prompts()
    for skill, path in zoo_tasks().items():
        items = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(items) == data.SHIPPED_EVAL_SIZE
        assert items[: data.EVAL_SIZE] == data.eval_items(skill)  # the always-excluded part comes first
        assert items == data.eval_items(skill, data.SHIPPED_EVAL_SIZE, skip=trained)
        assert not trained & {item["prompt"] for item in items}
