"""Prompts per image: the user's, a file's (JSON or name<TAB>prompt), or the default with a note."""

import json

import pytest

from diffbody_jax.pipelines.prompts import DEFAULT_PROMPT, prompts_for


def test_one_prompt_or_the_default_for_every_image(tmp_path):
    paths = [tmp_path / "a.jpg", tmp_path / "b.png"]
    assert prompts_for(paths) == ([DEFAULT_PROMPT] * 2, [])
    assert prompts_for(paths, prompt="a man in a coat") == (["a man in a coat"] * 2, [])


@pytest.mark.parametrize("kind", ["json", "tsv"])
def test_a_prompts_file_names_images_by_file_name_or_stem(tmp_path, kind):
    table = {"a.jpg": "a woman astronaut", "c": "a child"}
    file = tmp_path / f"prompts.{kind}"
    if kind == "json":
        file.write_text(json.dumps(table))
    else:
        file.write_text("# name\tprompt\n\n" + "".join(f"{k}\t{v}\n" for k, v in table.items()))
    paths = [tmp_path / "a.jpg", tmp_path / "b.png", tmp_path / "c.webp"]
    prompts, notes = prompts_for(paths, prompts_file=file)
    assert prompts == ["a woman astronaut", DEFAULT_PROMPT, "a child"]
    assert notes == [f"{paths[1]}: default prompt (not named in {file})"]


def test_bad_prompt_files_are_named(tmp_path):
    bad = tmp_path / "p.tsv"
    bad.write_text("a.jpg a woman without a tab\n")
    with pytest.raises(ValueError, match=r"p.tsv, line 1: expected 'image name<TAB>prompt'"):
        prompts_for([tmp_path / "a.jpg"], prompts_file=bad)
    other = tmp_path / "q.json"
    other.write_text(json.dumps({"z.jpg": "someone"}))
    with pytest.raises(ValueError, match="names none of the 1 inputs"):
        prompts_for([tmp_path / "a.jpg"], prompts_file=other)
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        prompts_for([tmp_path / "a.jpg"], prompts_file=tmp_path / "missing.tsv")
    with pytest.raises(ValueError, match="either a prompt or a prompts file"):
        prompts_for([tmp_path / "a.jpg"], prompt="x", prompts_file=other)
