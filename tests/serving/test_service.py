"""The page's restore service on the tiny stand-in weights, without a browser: a request gives the PNG `diffbody
restore --batch 1` writes with the same settings and seed; bad uploads are named by the browser's file name (never
the server's path) while the good ones are restored; a second request of the same settings reuses the loaded models
and compiled programs; a session's files go when it ends."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffbody_jax.cli.main import main
from diffbody_jax.pipelines.restore import RestoreSettings
from diffbody_jax.serving import service as service_module
from diffbody_jax.serving.service import RestoreService, Upload, safe_stem

SETTINGS = RestoreSettings(version="v1", steps=2, size=64)


@pytest.fixture(scope="module")
def service(stand_in_weights, tmp_path_factory):
    s = RestoreService(stand_in_weights, annotator=None, root=tmp_path_factory.mktemp("serve"))
    yield s
    s.close()


def _upload(folder, name, pixels=None, data=None):
    """A file as gradio stores an upload: in a folder of its own, under the base of the browser's name."""
    path = folder / Path(name).name
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is not None:
        path.write_bytes(data)
    else:
        Image.fromarray(pixels).save(path)
    return Upload(str(path), name)


def test_a_request_restores_as_the_restore_command_does(service, stand_in_weights, tmp_path, rng):
    photo = (rng.uniform(0, 1, (72, 64, 3)) * 255).astype(np.uint8)
    upload = _upload(tmp_path / "upload", "person.png", photo)
    steps = []
    result = service.restore("tab-a", [upload], SETTINGS, seed=3, progress=lambda *a: steps.append(a))
    assert [p.name for p in result.photos] == ["person.png"]
    restored = result.photos[0]
    assert steps == [(0, 1, 1, 0), (0, 1, 1, 1)]  # (photo, photos, stage, step) for v1's two steps
    rc = main(["restore", upload.path, "--out", str(tmp_path / "cli"), "--weights", str(stand_in_weights),
               "--steps", "2", "--size", "64", "--batch", "1", "--seed", "3", "--annotator", "none", "--quiet"])
    assert rc == 0
    page_png = np.asarray(Image.open(restored.download))
    cli_png = np.asarray(Image.open(tmp_path / "cli" / "person.png"))
    np.testing.assert_array_equal(page_png, cli_png)
    np.testing.assert_array_equal(restored.after, cli_png)
    np.testing.assert_array_equal(restored.before, photo)
    labels = [label for label, _ in restored.intermediates]
    assert labels == ["I_reg (SwinIR)", "I_attn (attention)", "pose map"]
    assert all(path.is_file() for _, path in restored.intermediates)


def test_bad_uploads_are_named_and_the_good_one_restored(service, tmp_path, rng, monkeypatch):
    folder = tmp_path / "uploads"
    good = (rng.uniform(0, 1, (64, 64, 3)) * 255).astype(np.uint8)
    uploads = [_upload(folder / "1", "notes.png", data=b"not an image at all"),
               _upload(folder / "2", "tiny.png", good[:32, :32]),
               _upload(folder / "3", "big.png", good),
               _upload(folder / "4", "../../etc/ok photo.png", np.full_like(good, 90)),  # compresses: a small file
               _upload(folder / "5", "../../etc/ok photo.png", np.full_like(good, 120))]  # the same name again
    monkeypatch.setattr(service_module, "MAX_UPLOAD_BYTES", (folder / "3" / "big.png").stat().st_size - 1)
    result = service.restore("tab-b", uploads, SETTINGS, seed=0)
    assert [p.name for p in result.photos] == ["../../etc/ok photo.png", "../../etc/ok photo.png (2)"]
    assert [p.download.name for p in result.photos] == ["ok_photo.png", "ok_photo_2.png"]  # safe, in the session
    assert result.photos[0].before.mean() == 90 and result.photos[1].before.mean() == 120
    assert result.photos[0].download.is_relative_to(service.root)
    problems = [m for m in result.messages if "pose maps are black" not in m]
    assert len(problems) == 3, result.messages
    for name, problem in (("notes.png", "not an image"), ("tiny.png", "below the minimum"),
                          ("big.png", "above the limit")):
        assert any(m.startswith(f"{name}: ") and problem in m for m in problems), (name, problems)
    assert not any(str(folder) in m or str(service.root) in m for m in result.messages)  # no server path shown


def test_a_second_request_reuses_the_models_and_programs(service, tmp_path, rng):
    """No XLA compilation in the second request of the same settings and shape (jax's compile events counted)."""
    import jax

    compiles, listening = [], [False]
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compiles.append(event) if listening[0] and "backend_compile" in event else None)
    photo = (rng.uniform(0, 1, (64, 80, 3)) * 255).astype(np.uint8)
    service.restore("tab-c", [_upload(tmp_path / "a", "a.png", photo)], SETTINGS, seed=0)
    built = service.restorers_built
    listening[0] = True
    result = service.restore("tab-c", [_upload(tmp_path / "b", "b.png", photo)], SETTINGS, seed=1)
    listening[0] = False
    assert len(result.photos) == 1
    assert service.restorers_built == built
    assert compiles == []


def test_ending_a_session_deletes_its_files(service, tmp_path, rng):
    photo = (rng.uniform(0, 1, (64, 64, 3)) * 255).astype(np.uint8)
    result = service.restore("tab-d", [_upload(tmp_path / "u", "p.png", photo)], SETTINGS, seed=0)
    folder = service.root / "tab-d"
    assert result.photos[0].download.is_relative_to(folder) and any(folder.rglob("*.png"))
    service.end_session("tab-d")
    assert not folder.exists()


def test_safe_stem_keeps_only_a_base_name():
    assert safe_stem("../../etc/passwd") == "passwd"
    assert safe_stem("C:\\Users\\me\\my photo (1).JPG") == "my_photo_1"
    assert safe_stem("....png") == "photo"


def test_requests_from_two_tabs_run_one_at_a_time(service, tmp_path, rng, monkeypatch):
    """Two threads (two tabs) restoring at once: the device programs never overlap."""
    import threading
    import time

    from diffbody_jax.pipelines.restore import Restorer

    active, most, original = [0], [0], Restorer.restore

    def counted(self, *args, **kwargs):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.2)  # widen the window in which an unserialised second request would overlap
        try:
            return original(self, *args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(Restorer, "restore", counted)
    photo = (rng.uniform(0, 1, (64, 64, 3)) * 255).astype(np.uint8)
    results = {}

    def tab(name):
        results[name] = service.restore(name, [_upload(tmp_path / name, "p.png", photo)], SETTINGS, seed=0)

    threads = [threading.Thread(target=tab, args=(f"tab-{i}",)) for i in "xy"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == ["tab-x", "tab-y"] and all(len(r.photos) == 1 for r in results.values())
    assert most[0] == 1


def test_the_oldest_setting_is_dropped_before_a_new_one_loads(tmp_path, monkeypatch):
    """keep=2: a third setting drops the first before it loads (never three copies of the weights)."""
    from diffbody_jax.serving import service as module

    alive = []

    class FakeRestorer:  # what loading costs is the point here, not restoring
        def __init__(self, weights, settings, **kwargs):
            alive.append(settings.steps)
            assert len(service.restorers) < 2, "a copy is loaded while `keep` are still held"

    monkeypatch.setattr(module, "Restorer", FakeRestorer)
    service = RestoreService(tmp_path, keep=2, root=tmp_path)
    for steps in (1, 2, 1, 3):
        service.restorer(RestoreSettings(steps=steps))
    assert alive == [1, 2, 3] and [s.steps for s in service.restorers] == [1, 3]
    with pytest.raises(ValueError, match="keep=0"):
        RestoreService(tmp_path, keep=0)
