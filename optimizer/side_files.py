"""What a recipe says about the written folder besides the weights and their dtype: its chat template.

mergekit's meaning: ``chat_template`` (a Jinja template, the name of a template mergekit ships, or ``auto``: the
template most input models share) is stored in the written tokenizer. (``tokenizer_source`` picks the tokenizer
copied next to the weights: :meth:`Recipe.tokenizer_folder`.)
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from optimizer.errors import MergeoptError


def named_chat_template(name: str) -> str:
    """The text of a chat template mergekit ships by name (chatml, llama3, ...); one line when there is none."""
    try:
        import importlib.resources

        from mergekit._data import chat_templates
    except ImportError:
        raise MergeoptError(f"chat_template {name!r} names one of mergekit's templates; install mergekit "
                            "(pip install mergekit) or give the Jinja template itself") from None
    files = importlib.resources.files(chat_templates)
    path = files.joinpath(name + ".jinja")
    if "/" in name or not path.is_file():
        known = sorted(p.name.removesuffix(".jinja") for p in files.iterdir() if p.name.endswith(".jinja"))
        raise MergeoptError(f"chat_template {name!r} is neither a Jinja template nor a known name "
                            f"({', '.join(known)}, auto)")
    return path.read_text()


def check_chat_template(template: str | None) -> None:
    """Refuse at parse time what mergekit refuses when it writes the tokenizer."""
    if template is None or template == "auto":
        return
    if "{" in template:
        if len(template) < 20:
            raise MergeoptError(f"chat_template {template!r} is too short to be a Jinja template")
        return
    named_chat_template(template)


def chat_template_text(recipe) -> str | None:
    template = recipe.chat_template
    if template is None:
        return None
    if template == "auto":
        folders = ([recipe.base_model] if recipe.base_model else []) + [m.model for m in recipe.models]
        return _plurality_template(folders)
    if "{" in template:
        return template
    return named_chat_template(template)


def _plurality_template(folders: list[str]) -> str | None:
    from transformers import AutoTokenizer

    found = []
    for folder in folders:
        try:
            template = AutoTokenizer.from_pretrained(folder, trust_remote_code=False).chat_template
        except Exception:  # a model without a loadable tokenizer has no vote, as in mergekit
            continue
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            found.append(template.strip())
    return Counter(found).most_common(1)[0][0] if found else None


def write_chat_template(recipe, out_dir: str | Path) -> None:
    """Store the recipe's chat template in the written tokenizer (nothing when the recipe sets none)."""
    text = chat_template_text(recipe)
    if text is None:
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(out_dir), trust_remote_code=False)
    except Exception as exc:
        raise MergeoptError(f"chat_template: the merged folder {out_dir} has no tokenizer to hold it "
                            f"({type(exc).__name__}); set tokenizer_source to a model with a tokenizer") from None
    tokenizer.chat_template = text
    tokenizer.save_pretrained(str(out_dir))
