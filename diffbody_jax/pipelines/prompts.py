"""The text each restored photo is conditioned on: the user's prompt, per-image prompts from a file, or a default;
and the negative prompt for classifier-free guidance.

    prompts, notes = prompts_for(paths, prompt=None, prompts_file="prompts.tsv")

A prompts file is either JSON (an object {image name or stem: prompt}) or text, one `name<TAB>prompt` per line
(blank lines and lines starting with # skipped). Names match an input's file name ("a.jpg") or its stem ("a").
Images the file does not name get the default prompt, with a note naming them; a file naming no input at all, or
a malformed line, is an error naming the file and line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

# Restoration prompts describe the wanted result, not the damage. Ours; the papers caption I_ir with LLaVA.
DEFAULT_PROMPT = "a sharp, detailed, high-quality photo of a person"
DEFAULT_NEGATIVE_PROMPT = ("blurry, noisy, jpeg artifacts, low quality, deformed body, extra limbs, bad hands, "
                           "cartoon, painting")


def read_prompts_file(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompts file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            table = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise ValueError(f"{path}: expected a JSON object of image name -> prompt string")
        return {str(k): v for k, v in table.items()}
    table = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, prompt = line.partition("\t")
        if not sep or not name.strip():
            raise ValueError(f"{path}, line {number}: expected 'image name<TAB>prompt', got {line[:60]!r}")
        table[name.strip()] = prompt.strip()
    return table


def prompts_for(paths: Sequence[str | os.PathLike], prompt: str | None = None,
                prompts_file: str | os.PathLike | None = None,
                default: str = DEFAULT_PROMPT) -> tuple[list[str], list[str]]:
    """One prompt per input path, and notes ("name: default prompt (not in FILE)")."""
    if prompt is not None and prompts_file is not None:
        raise ValueError("give either a prompt or a prompts file, not both")
    paths = [Path(p) for p in paths]
    if prompts_file is None:
        return [default if prompt is None else prompt] * len(paths), []
    table = read_prompts_file(prompts_file)
    out, notes, used = [], [], 0
    for p in paths:
        key = p.name if p.name in table else p.stem if p.stem in table else None
        if key is None:
            out.append(default)
            notes.append(f"{p}: default prompt (not named in {prompts_file})")
        else:
            out.append(table[key])
            used += 1
    if paths and not used:
        raise ValueError(f"{prompts_file}: names none of the {len(paths)} inputs (e.g. {paths[0].name!r})")
    return out, notes
