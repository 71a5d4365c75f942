"""The README's two commands are the contract with users and CI: keep .ci/run on the same test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    quickstart = ROOT.joinpath("README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quickstart, flags=re.S)


def test_quickstart_has_exactly_two_commands_pinning_torch():
    commands = readme_commands()
    assert len(commands) == 2
    for command in commands:
        assert "\n" not in command.strip()
        assert "torch==2.13.0" in command


def test_ci_runs_the_readme_test_command():
    ci = ROOT.joinpath(".ci", "run").read_text().splitlines()
    assert readme_commands()[1].strip() in [line.strip() for line in ci]


def test_ci_runs_lint_types_and_every_tier():
    ci = [line.strip() for line in ROOT.joinpath(".ci", "run").read_text().splitlines()]
    assert "ruff check optimizer tests benchmarks" in ci and "mypy" in ci and "python -m pytest -m slow" in ci
    assert any("-m vllm" in line for line in ci)


def layout_paths() -> list[str]:
    section = ROOT.joinpath("README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\n(.+?)\n```", section, flags=re.S).group(1)
    return [line.split()[0] for line in block.splitlines() if line and not line.startswith(" ")]


def test_the_layout_section_matches_the_tree():
    paths = layout_paths()
    missing = [p for p in paths if not ROOT.joinpath(p).exists()]
    assert not missing, f"the README's layout names paths that do not exist: {missing}"
    package = ROOT / "optimizer"
    entries = {f"optimizer/{p.name}" + ("/" if p.is_dir() else "") for p in package.iterdir()
               if p.name != "__init__.py" and not p.name.startswith(("_", ".")) and (p.is_dir() or p.suffix == ".py")}
    unlisted = sorted(entries - set(paths))
    assert not unlisted, f"the README's layout leaves out {unlisted}"
    for folder in ("merge", "evaluate", "search"):
        described = section_text_after(f"optimizer/{folder}/")
        for module in sorted((package / folder).glob("*.py")):
            if module.name != "__init__.py":
                assert module.stem in described, f"the layout's optimizer/{folder}/ line does not name {module.stem}"


def section_text_after(path: str) -> str:
    """The layout line of ``path`` and its continuation lines."""
    section = ROOT.joinpath("README.md").read_text().split("## Layout", 1)[1]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(path))
    text = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith(" "):
            break
        text.append(line)
    return " ".join(text)


def test_the_readme_links_nothing_outside_the_repository():
    links = re.findall(r"\]\(([^)]+)\)", ROOT.joinpath("README.md").read_text())
    assert links
    for target in links:
        path = target.split("#", 1)[0]
        assert not path.startswith(("/", "..", "http:", "https:", "file:")), target
        assert ROOT.joinpath(path).resolve().is_relative_to(ROOT) and ROOT.joinpath(path).exists(), target


def test_the_readmes_merge_example_writes_where_git_ignores_it():
    import subprocess

    outs = re.findall(r"mergeopt merge \S+ --out (\S+)", ROOT.joinpath("README.md").read_text().split("## Commands")[0])
    assert outs
    for out in outs:
        check = subprocess.run(["git", "check-ignore", "-q", f"{out}/model.safetensors"], cwd=ROOT)
        assert check.returncode == 0, f"{out} is not ignored by git: a user's merged model would show as untracked"
