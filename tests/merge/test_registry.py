"""The merge-method registry: one declaration per method, read by recipe validation, the CLI help and the docs."""

from pathlib import Path

import pytest

from optimizer.cli import build_parser
from optimizer.errors import MergeoptError
from optimizer.methods import (
    FUSED_METHODS,
    METHODS,
    SEARCHABLE_METHODS,
    check_parameters,
    method_spec,
    methods_help,
    methods_markdown,
)

mergekit_registry = pytest.importorskip("mergekit.merge_methods.registry")


def test_every_mergekit_method_is_declared_with_mergekits_parameters():
    """Names, defaults, required flags and scopes match mergekit 0.1.5's own declarations."""
    theirs = {m.spec.name: m.spec for m in mergekit_registry.registered_methods()}
    assert set(METHODS) == set(theirs)
    scopes = {"shared": "shared", "non_base": "per_model", "input": "per_input"}
    for name, spec in METHODS.items():
        their_params = {p.name: p for p in theirs[name].parameters}
        assert {p.name for p in spec.parameters} == set(their_params), name
        for p in spec.parameters:
            other = their_params[p.name]
            assert p.required == other.required, (name, p.name)
            assert p.scope == scopes[other.scope.value], (name, p.name)
            if not p.required:
                assert p.default == other.default, (name, p.name)
        assert spec.base == theirs[name].contract.base.value or (spec.base, theirs[name].contract.base.value) == \
            ("required", "required"), name


def test_fused_and_searchable_methods():
    assert FUSED_METHODS == ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
    assert SEARCHABLE_METHODS == ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                                  "breadcrumbs_ties", "della", "della_linear", "slerp", "nuslerp", "model_stock")
    torch_path = {name for name, spec in METHODS.items() if spec.engine == "torch"}
    assert torch_path == {"slerp", "nuslerp", "model_stock", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}
    assert all(METHODS[name].in_engine and not METHODS[name].fused for name in torch_path)
    assert METHODS["ties"].default_normalize and not METHODS["dare_ties"].default_normalize


@pytest.mark.parametrize("params,message", [
    ({"densty": 0.5}, r"models\[0\]\.parameters\.densty: unknown parameter \(did you mean 'density'\?\)"),
    ({"weigth": 0.5}, "did you mean 'weight'"),
    ({"density": 1.5}, r"density: 1.5 is outside \[0, 1\]"),
    ({"density": -0.1}, r"density: -0.1 is outside \[0, 1\]"),
    ({"weight": "abc"}, "weight: 'abc' is not a number"),
    ({"weight": True}, "weight: True is not a number"),
    ({"weight": [0.1, "x"]}, r"weight\[1\]: 'x' is not a number"),
    ({"density": [{"filter": "mlp", "value": 2}]}, r"density: 2 is outside \[0, 1\]"),
    ({"weight": [[1]]}, "expected a number, a list of numbers"),
    ({"weight": None}, "expected a number"),
    ({"zzz": 1}, "unknown parameter; ties reads weight, density"),
])
def test_bad_parameters_are_one_line_naming_the_key(params, message):
    with pytest.raises(MergeoptError, match=message):
        check_parameters(METHODS["ties"], params, "models[0].parameters")


def test_values_are_coerced_to_the_declared_type():
    out = check_parameters(METHODS["ties"], {"weight": "0.5", "density": ["1e-1", 1], "normalize": "false",
                                             "int8_mask": 1, "lambda": {"filter": "mlp", "value": "2"}},
                           "parameters")
    assert out == {"weight": 0.5, "density": [0.1, 1], "normalize": False, "int8_mask": True,
                   "lambda": {"filter": "mlp", "value": 2.0}}
    with pytest.raises(MergeoptError, match="normalize: 'maybe' is not true or false"):
        check_parameters(METHODS["ties"], {"normalize": "maybe"}, "parameters")
    with pytest.raises(MergeoptError, match="max_iter: 2.5 is not a whole number"):
        check_parameters(METHODS["karcher"], {"max_iter": 2.5}, "parameters")


def test_a_parameter_another_method_reads_is_ignored_as_mergekit_does():
    """lambda means nothing to linear; mergekit ignores it there, so it is kept (round trip) and ignored."""
    assert check_parameters(METHODS["linear"], {"lambda": 0.5}, "parameters") == {"lambda": 0.5}


def test_unknown_method_names_the_nearest():
    with pytest.raises(MergeoptError, match=r"merge_method 'dare_tie' is not a merge method \(did you mean 'dare_ties'\?\)"):
        method_spec("dare_tie")


def test_cli_help_and_readme_read_the_registry():
    parser = build_parser()
    merge_help = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "merge")[1]
    text = merge_help.format_help()
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert methods_markdown() in readme  # regenerate the README's table from the registry when this fails
    for name, spec in METHODS.items():
        assert name in text, name
        for p in spec.parameters:
            assert p.name in methods_help()
    assert "through mergekit" in text
    # what a search space may vary, per searchable method
    lines = {line.split()[0]: line for line in methods_help().splitlines()}
    assert lines["slerp"].endswith("[genes: t]") and lines["model_stock"].endswith("[genes: use (which models)]")
    assert lines["della"].endswith("[genes: weight, drop_rate (+ lambda, epsilon)]") and "genes" not in lines["karcher"]


def test_a_search_space_can_bound_every_gene_the_registry_declares():
    """space.BoundsConfig has an entry for each gene parameter of each searchable method (a new one needs a field),
    with the registry's range as its limits."""
    from optimizer.methods import gene_parameters
    from optimizer.space import BoundsConfig

    fields = {f.alias or name for name, f in BoundsConfig.model_fields.items()}
    declared = {p.name for name in SEARCHABLE_METHODS for p in gene_parameters(METHODS[name])}
    assert declared | {"drop_rate"} == fields
    for name in declared - {"weight"}:
        spec = next(METHODS[m] for m in SEARCHABLE_METHODS if METHODS[m].has(name))
        low, high = spec.parameter(name).gene
        BoundsConfig.model_validate({name: [low, high]})
        if spec.parameter(name).high is not None:
            with pytest.raises(ValueError, match="must lie within"):
                BoundsConfig.model_validate({name: [low, spec.parameter(name).high + 0.5]})
