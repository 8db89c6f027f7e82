"""Class lists: a model's classes in output order, so that images named by class id get the right index.

A class list is a text file with one class a line; the first whitespace-separated token is the
class id (an ImageNet WordNet id such as ``n01440764``), the rest of the line is free text (its
names). Blank lines and ``#`` comments are skipped. ``imagenet1k`` names the built-in list of the
1000 ImageNet-1k classes in the standard order (sorted WordNet ids), shipped with the package.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from intraq_core.errors import DatasetError

__all__ = ["BUILTIN_CLASS_LISTS", "load_class_list", "parse_class_list"]

#: Built-in class lists: name -> file under ``intraq_core/resources``.
BUILTIN_CLASS_LISTS: dict[str, str] = {"imagenet1k": "imagenet1k_classes.txt"}


def parse_class_list(text: str, source: str) -> list[str]:
    """The class ids of a class-list text, in order; DatasetError on an empty list or a repeated id."""
    ids: list[str] = []
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        class_id = line.split()[0]
        if class_id in first_line:
            first = first_line[class_id]
            raise DatasetError(f"{source}: class '{class_id}' on line {lineno} is already on line {first}")
        first_line[class_id] = lineno
        ids.append(class_id)
    if not ids:
        raise DatasetError(f"{source}: the class list is empty")
    return ids


def load_class_list(spec: str) -> list[str]:
    """The class ids of ``spec``: a built-in list (``imagenet1k``) or a class-list file."""
    if spec in BUILTIN_CLASS_LISTS:
        text = resources.files("intraq_core").joinpath("resources", BUILTIN_CLASS_LISTS[spec]).read_text("utf-8")
        return parse_class_list(text, spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        builtin = ", ".join(sorted(BUILTIN_CLASS_LISTS))
        raise DatasetError(f"eval.classes={spec!r}: no such file and not a built-in class list ({builtin})")
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"eval.classes={spec!r}: cannot read the class list ({exc})") from exc
    return parse_class_list(text, str(path))
