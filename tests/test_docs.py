"""Every ```python and ```bash block of README.md, docs/*.md and bench/README.md runs, in order, on tiny models.

The blocks run in a scratch folder that holds a *tiny* stand-in for each checkpoint the docs name
(`stable-diffusion-2-1-base/` with a random tiny UNet, VAE and CLIP text encoder, the real tokenizer and
scheduler configs), so the documented commands and calls work as written, without weights or network.
Python blocks of one file share a namespace. A bash block of plain `diffbody ...` commands (and `cat FILE`) runs
in this process through `cli.main.main`, as the console script would call it (the script itself and
`python -m diffbody_jax.cli.main` are run in their own processes by tests/cli/test_main.py), so the documented
commands share one interpreter and its compiled programs; any other bash block runs with `bash -euo pipefail`.
Blocks fenced ```text (set-up commands that install packages) are not run. README.md stays a short guide: at most
250 lines.
"""

import ast
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.conftest import shared_folder
from tests.torch_ref import (
    REPO,
    bodypart_config,
    randomize_,
    resampler_config,
    unet_diffusers_config,
    vae_diffusers_config,
)

DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")), "bench/README.md"]
FENCE = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)


def code_blocks(doc: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer((REPO / doc).read_text())]


def _env() -> dict[str, str]:
    """The environment of the documented commands: this checkout importable, this venv's scripts on PATH."""
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="session")
def world(tmp_path_factory, stand_in_weights):
    """A folder with tiny stand-ins for the checkpoints the docs name, written once per run (all workers share it);
    its demo/weights is the suite's stand-in weights folder."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    return shared_folder(tmp_path_factory, "docs-world", lambda root: _write_world(root, stand_in_weights))


def _write_world(root: pathlib.Path, weights: pathlib.Path) -> None:
    import diffusers
    import torch
    import transformers

    sd = root / "stable-diffusion-2-1-base"
    real = REPO / "configs/diffusers/sd21-base"
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**unet_diffusers_config("tiny-sd21")).eval()
    randomize_(unet, seed=1)
    unet.save_pretrained(sd / "unet")
    vae = diffusers.AutoencoderKL(**vae_diffusers_config("tiny")).eval()
    randomize_(vae, seed=2)
    vae.save_pretrained(sd / "vae")
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407)).eval()
    randomize_(te, seed=3)
    te.save_pretrained(sd / "text_encoder")
    shutil.copytree(real / "tokenizer", sd / "tokenizer")
    shutil.copytree(real / "scheduler", sd / "scheduler")
    (sd / "model_index.json").write_text(json.dumps(json.loads((real / "model_index.json").read_text())))
    cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16)).eval()
    randomize_(cn, seed=4)
    cn.save_pretrained(root / "controlnet-sd21-depth")
    _tiny_files(root)
    _demo_folder(root / "demo", weights)
    (root / "bench").symlink_to(REPO / "bench")  # README's commands run from the project root


def _demo_folder(out: pathlib.Path, weights: pathlib.Path) -> None:
    """What `diffbody demo` leaves that the docs use: clean/, degraded/, keypoints.jsonl and weights/ (a link to the
    suite's stand-in weights; the demo itself is tested in tests/cli/test_demo.py)."""
    from diffbody_jax.cli.demo import DEMO_SIZE, demo_inputs
    from diffbody_jax.data.manifest import read_manifest
    from diffbody_jax.data.sample_set import write_sample_set
    from diffbody_jax.evaluation.held_out import write_held_out

    records = read_manifest(write_sample_set(out / "data"))
    write_held_out(out, demo_inputs(records, ((DEMO_SIZE, DEMO_SIZE),)))
    (out / "weights").symlink_to(weights, target_is_directory=True)


def _tiny_files(root: pathlib.Path) -> None:
    """Stand-ins, in the original PyTorch formats, for SwinIR, BPBreID, an SDXL ControlNet and IP-Adapter-Plus."""
    import jax

    from diffbody_jax.config import load_config
    from diffbody_jax.interop.bodypart import save_bodypart
    from diffbody_jax.interop.ip_adapter import original_state_dict, write_ip_adapter
    from diffbody_jax.interop.pretrained import save_pretrained
    from diffbody_jax.interop.swinir import save_swinir
    from diffbody_jax.models.bodypart import BodyPartNet
    from diffbody_jax.models.ip_adapter import Resampler, ip_adapter_of
    from diffbody_jax.models.registry import build_model
    from diffbody_jax.models.swinir import SwinIR, SwinIRConfig
    from diffbody_jax.models.unet import UNet2DConditionModel, UNetConfig

    key = jax.random.key(0)
    swinir = SwinIRConfig.from_dict(load_config("swinir:variant=tiny-diffbir").model.swinir.to_dict())
    save_swinir(root / "swinir-tiny.pth", swinir, SwinIR(swinir).init_params(key))
    save_bodypart(root / "bpbreid-tiny.pth.tar", BodyPartNet(config=bodypart_config()).init_variables(key))
    cn = build_model(load_config("controlnet:variant=tiny-sdxl").model)
    save_pretrained(root / "controlnet-sdxl-tiny", cn, cn.init_params(key))
    unet = UNet2DConditionModel(UNetConfig.from_dict(unet_diffusers_config("tiny-sdxl")), ip_adapter=True)
    resampler = Resampler(resampler_config(output_dims=unet.config.cross_attention_dim))
    adapter = {"image_proj": resampler.init_params(key), "ip_adapter": ip_adapter_of(unet.init_params(key))}
    write_ip_adapter(root / "ip-adapter-tiny.bin", original_state_dict(adapter, unet.config))


# Run with -m slow only: docs/weights.md's commands (~90 s; each is also run by tests/cli/test_convert.py) and
# bench/README.md's quick benchmark runs (~60 s; benchmarks are run by hand on a quiet machine, never timed in tests)
SLOW_DOCS = ("docs/weights.md", "bench/README.md")


SHELL_SYNTAX = re.compile(r"[|&;<>$`*?]")


def plain_commands(code: str) -> list[list[str]] | None:
    """The argv of each command of a bash block when every one is a plain `diffbody ...`, `cat FILE` or
    `python -c CODE` call (continuation lines joined, comments dropped); None when the block needs a shell."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        if argv[0] not in ("diffbody", "cat", "python") or (argv[0] == "python" and argv[1:2] != ["-c"]):
            return None
        if argv[0] != "python" and any(SHELL_SYNTAX.search(a) for a in argv):
            return None
        commands.append(argv)
    return commands


def run_in_process(argv: list[str], where: str) -> None:
    from diffbody_jax.cli.main import main

    if argv[0] == "cat":
        for name in argv[1:]:
            print(pathlib.Path(name).read_text())
        return
    if argv[0] == "python":
        exec(compile(argv[2], where, "exec"), {"__name__": "__main__"})  # noqa: S102
        return
    try:
        code = main(argv[1:])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    assert code == 0, f"{where}: `{shlex.join(argv)}` exited {code}"


def run_block(code: str, where: str, cwd: pathlib.Path, timeout: int) -> None:
    commands = plain_commands(code)
    if commands is not None:
        for argv in commands:
            run_in_process(argv, where)
        return
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=_env(), capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"{where} failed:\n{code}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"


def test_readme_is_a_short_guide():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move detail to docs/"


@pytest.mark.parametrize("doc", [pytest.param(d, marks=pytest.mark.slow) if d in SLOW_DOCS else d for d in DOCS])
def test_code_blocks_run(doc, world, monkeypatch, tmp_path):
    blocks = code_blocks(doc)
    for item in world.iterdir():  # each page gets its own folder: the stand-ins linked, its outputs its own
        (tmp_path / item.name).symlink_to(item)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"doc:{doc}"}
    for i, (lang, code) in enumerate(blocks):
        where = f"{doc}, block {i + 1} ({lang})"
        if lang == "python":
            try:
                exec(compile(code, where, "exec"), namespace)  # noqa: S102
            except Exception as e:
                raise AssertionError(f"{where} failed: {type(e).__name__}: {e}\n{code}") from e
        else:
            run_block(code, where, tmp_path, timeout=900)


def config_commands(path: pathlib.Path) -> list[str]:
    """The usage commands at the top of a config file's docstring (lines starting "  python" or "  diffbody",
    with their backslash continuations)."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    commands, current = [], ""
    for line in doc.splitlines():
        if current:
            current += " " + line.strip()
        elif line.startswith(("  python ", "  diffbody ")):
            current = line.strip()
        if current and not current.endswith("\\"):
            commands.append(current)
            current = ""
        elif current:
            current = current[:-1].rstrip()
    return commands


@pytest.mark.parametrize("config_file", sorted(p.name for p in (REPO / "configs").glob("*.py")))
def test_config_docstring_commands_run_as_written(config_file, world, tmp_path, monkeypatch):
    commands = config_commands(REPO / "configs" / config_file)
    assert commands, f"configs/{config_file}: no usage command in its docstring"
    for item in world.iterdir():
        (tmp_path / item.name).symlink_to(item)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    for command in commands:
        run_block(command, f"configs/{config_file}", tmp_path, timeout=600)
