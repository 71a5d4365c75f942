"""Every message the README quotes is the one the program prints: each quote is produced here by the code that
prints it, and a quote of a message that no producer below covers fails the last test."""

import re
from pathlib import Path

import pytest
from helpers import write_space

from optimizer.errors import MergeoptError
from optimizer.recipe import Recipe
from optimizer.space import load_space

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
MESSAGE_WORDS = re.compile(r"did you mean|unknown|is outside|is not a number|needed of|must be|refused|spent its")


def _refusal(make) -> str:
    with pytest.raises(MergeoptError) as info:
        make()
    return str(info.value)


def _recipe(**params):
    return lambda: Recipe.from_dict({"merge_method": "ties", "base_model": "b",
                                     "models": [{"model": "a", "parameters": {"weight": 1, **params}}]})


def _space(search_setup, **keys):
    return lambda: load_space(write_space(search_setup, "readme", **keys))


def _spent(trials: int) -> str:
    from optimizer.search.loop import SPENT  # tests/search/test_config.py runs a search into it

    return SPENT % (trials, trials)


def _objectivs(search_setup):
    import yaml

    path = write_space(search_setup, "readme-typo")
    data = yaml.safe_load(path.read_text())
    data["objectivs"] = data.pop("objectives")
    path.write_text(yaml.safe_dump(data))
    return lambda: load_space(path)


PRODUCERS = {
    "--minutes: must be a positive number, got -1.0": lambda setup: _refusal(
        lambda: load_space(write_space(setup, "readme-minutes"), {"minutes": -1.0})),
    "optimizer.popsize: must be a positive integer, got 'eight'": lambda setup: _refusal(
        _space(setup, optimizer={"name": "cma", "popsize": "eight"})),
    "the run has spent its budget (96 of 96 trials); raise it with --trials to search on": lambda setup: _spent(96),
    "unknown key 'objectivs' (did you mean 'objectives'?)": lambda setup: _refusal(_objectivs(setup)),
    "densty: unknown parameter (did you mean 'density'?)": lambda setup: _refusal(_recipe(densty=0.5)),
    "density: 1.5 is outside [0, 1]": lambda setup: _refusal(_recipe(density=1.5)),
    "weight: 'abc' is not a number": lambda setup: _refusal(
        lambda: Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": "b",
                                  "models": [{"model": "a", "parameters": {"weight": "abc"}}]})),
}


@pytest.mark.parametrize("quote", list(PRODUCERS))
def test_the_readme_quotes_what_the_program_prints(quote, search_setup):
    assert f"`{quote}`" in README, f"the README no longer quotes {quote!r}: drop it here"
    printed = PRODUCERS[quote](search_setup)
    assert quote in printed, (quote, printed)


def test_every_quoted_message_has_a_producer():
    quoted = {span for span in re.findall(r"`([^`\n]+)`", README) if MESSAGE_WORDS.search(span)
              and not span.startswith(("mergeopt ", "python ", "pip "))}
    untested = sorted(quoted - set(PRODUCERS))
    assert not untested, f"README quotes messages no test produces: {untested}"
