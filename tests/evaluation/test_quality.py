"""`diffbody eval --metrics`: the chosen metrics in the v2 paper's Table-1 layout (a row per mixture and method, a
column per metric with its arrow); a metric without weights is named in one line and left out; the input row's LPIPS
is the lpips package's on the same arrays, its CLIP-IQA, MANIQA and MUSIQ pyiqa's; v2's prior errors are the mean
squared difference between stage 1's maps and the estimators' maps of the reference (float64 numpy on the maps the
run produced)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffbody_jax.cli.main import main
from diffbody_jax.conditioning.prompts import load_tokenizer, tokenize
from diffbody_jax.data.degradations import TABLE1_MIXTURES
from diffbody_jax.evaluation.clip_iqa import CLIP_MEAN, CLIP_STD, PAPER_PROMPTS
from diffbody_jax.evaluation.quality import MetricSet, MetricWeights, parse_names
from diffbody_jax.evaluation.table1 import evaluate, evaluation_jobs, markdown_table
from diffbody_jax.interop.lpips import packaged_lin_weights
from diffbody_jax.pipelines.image_io import read_photo
from diffbody_jax.pipelines.jobs import PoseSource
from diffbody_jax.pipelines.restore import Restorer, RestoreSettings
from tests.evaluation.test_clip_iqa import _random_clip, pyiqa_clip  # noqa: F401 - the fixture
from tests.evaluation.test_lpips import (
    _reference,
    _torchvision_features,
    lpips_module,  # noqa: F401 - the fixture
)
from tests.evaluation.test_maniqa import maniqa_arch, random_maniqa  # noqa: F401 - the fixture
from tests.evaluation.test_musiq import musiq_arch, random_musiq  # noqa: F401 - the fixture

MIXTURE = list(TABLE1_MIXTURES)[1]


def _ground_truth(folder, rng, hw=(64, 64)):
    folder.mkdir()
    smooth = np.kron(rng.uniform(0, 1, (hw[0] // 8, hw[1] // 8, 3)), np.ones((8, 8, 1)))
    Image.fromarray((smooth * 255).astype(np.uint8)).save(folder / "gt.png")
    return folder / "gt.png"


def test_eval_reports_the_chosen_metrics_and_names_the_missing(stand_in_weights, lpips_module, pyiqa_clip,  # noqa: F811
                                                               maniqa_arch, musiq_arch, tmp_path, rng,  # noqa: F811
                                                               capsys):
    gt = _ground_truth(tmp_path / "gt", rng)
    torch.manual_seed(int(rng.integers(2**31)))
    features = _torchvision_features("alex")
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, tmp_path / "alexnet.pth")
    clip = _random_clip(pyiqa_clip, int(rng.integers(2**31)))
    torch.save(clip.state_dict(), tmp_path / "rn.pt")
    maniqa = random_maniqa(maniqa_arch, int(rng.integers(2**31)), scale=0.13)
    torch.save(maniqa.state_dict(), tmp_path / "maniqa.pth")
    musiq = random_musiq(musiq_arch, int(rng.integers(2**31)))
    torch.save(musiq.state_dict(), tmp_path / "musiq.pth")
    out = tmp_path / "eval"
    assert main(["eval", str(gt.parent), "--weights", str(stand_in_weights), "--out", str(out), "--mixtures", MIXTURE,
                 "--size", "64", "--steps", "1", "--sampler", "ddim", "--annotator", "none", "--save-images",
                 "--quiet", "--metrics", "psnr,lpips,lpips-vgg,maniqa,clipiqa,musiq",
                 "--lpips-alex", str(tmp_path / "alexnet.pth"), "--clip-rn50", str(tmp_path / "rn.pt"),
                 "--maniqa", str(tmp_path / "maniqa.pth"), "--maniqa-scale", "0.13",
                 "--musiq", str(tmp_path / "musiq.pth")]) == 0
    err = capsys.readouterr().err
    assert "note: lpips-vgg: left out, no weights (--lpips-vgg FILE)" in err
    record = json.loads((out / "metrics.json").read_text())
    assert record["metrics"] == ["psnr", "lpips", "maniqa", "clipiqa", "musiq"]
    row = record["per_photo"][MIXTURE]["gt.png"]
    assert set(row) == {"degraded", "swinir", "restored"}
    assert all(set(v) == set(record["metrics"]) for v in row.values())
    table = (out / "metrics.md").read_text().splitlines()
    assert "| degradation | method | PSNR ↑ | LPIPS ↓ | MANIQA ↑ | CLIP-IQA ↑ | MUSIQ ↑ |" in table
    assert [line.split(" | ")[1] for line in table if line.startswith(f"| {MIXTURE} ")] == \
        ["input", "SwinIR", "DiffBody v1"]

    # the input row's LPIPS: the lpips package on the same reference and degraded arrays (the run's own, in float)
    settings = RestoreSettings(size=64)
    (job,), (reference,) = evaluation_jobs([read_photo(gt)], MIXTURE, 0, settings, ["p"], PoseSource(), 0)
    net = _reference(lpips_module, "alex", features, packaged_lin_weights("alex"))
    with torch.no_grad():
        want = net(*(torch.from_numpy(np.asarray(x, np.float32)).permute(2, 0, 1)[None]
                     for x in (job.photo.pixels, reference)), normalize=True).item()
    assert abs(row["degraded"]["lpips"] - want) <= 1e-5
    # and its CLIP-IQA: pyiqa's CLIP on the degraded input alone, the paper's prompt pair, as pyiqa's CLIPIQA scores
    ids = torch.from_numpy(tokenize(load_tokenizer(None, pad_token="!"), list(PAPER_PROMPTS[0])).astype(np.int64))
    x = (torch.from_numpy(np.asarray(job.photo.pixels, np.float32)).permute(2, 0, 1)[None]
         - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits, _ = clip(x, ids, pos_embedding=False)
        want = logits.reshape(1, -1, 2).softmax(dim=-1)[..., 0].mean().item()
    assert abs(row["degraded"]["clipiqa"] - want) <= 1e-4
    # and its MANIQA (at the --maniqa-scale given) and MUSIQ: pyiqa's networks on the degraded input
    with torch.no_grad():
        photo = torch.from_numpy(np.asarray(job.photo.pixels, np.float32)).permute(2, 0, 1)[None]
        assert abs(row["degraded"]["maniqa"] - maniqa(photo).item()) <= 1e-4
        assert abs(row["degraded"]["musiq"] - musiq(photo).item()) <= 1e-4


def test_unknown_metric_names_are_refused(capsys):
    with pytest.raises(ValueError, match=r"unknown \['brisque'\]; known: psnr, ssim"):
        parse_names("psnr,brisque")
    assert main(["eval", "gt", "--weights", "w", "--out", "o", "--metrics", "psnr,nope"]) == 1
    assert "--metrics 'psnr,nope': unknown ['nope']" in capsys.readouterr().err


def test_v2_prior_errors_are_the_mse_against_the_estimators(stand_in_weights, tmp_path, rng):
    gt = _ground_truth(tmp_path / "gt", rng)
    seen = {"depth": [], "normal": []}

    def depth_estimator(image):  # stand-ins for annotators.dense's estimators: any map of the reference
        seen["depth"].append(image)
        return image.mean(-1) ** 2

    def normal_estimator(image):
        seen["normal"].append(image)
        return image[..., ::-1].copy()

    metrics = MetricSet(["psnr"], MetricWeights(depth_estimator=depth_estimator, normal_estimator=normal_estimator))
    restorer = Restorer(stand_in_weights, RestoreSettings(version="v2", size=64, steps=1, sampler="ddim"))
    images = {}
    result = evaluate(restorer, [read_photo(gt)], ["a person"], PoseSource(), [MIXTURE], 0, 1,
                      on_image=lambda mixture, job, ims: images.update(ims), metrics=metrics)
    row = result["per_photo"][MIXTURE]["gt.png"]["restored"]
    reference = np.asarray(images["reference"], np.float64)
    np.testing.assert_array_equal(seen["depth"][0], images["reference"])  # the estimators saw the reference
    want_depth = np.mean((np.asarray(images["depth"], np.float64)[..., 0] - reference.mean(-1) ** 2) ** 2)
    want_normal = np.mean((np.asarray(images["normal"], np.float64) - reference[..., ::-1]) ** 2)
    assert row["depth_l2"] == pytest.approx(want_depth, rel=1e-5)
    assert row["normal_l2"] == pytest.approx(want_normal, rel=1e-5)
    assert "depth_l2" not in result["per_photo"][MIXTURE]["gt.png"]["degraded"]
    table = markdown_table(result["mean"], "v2", 1)
    assert "| degradation | method | PSNR ↑ | depth L2 ↓ | normal L2 ↓ |" in table
    assert f"| {MIXTURE} | input | " in table and table.count(" - |") == 4  # input and SwinIR have no prior errors
