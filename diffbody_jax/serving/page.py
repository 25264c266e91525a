"""`diffbody serve`'s page: a gradio Blocks app over a `RestoreService`.

    page = build_page(service, PageDefaults(size=64))
    launch(page, host="127.0.0.1", port=7860)

Upload one photo or several (drag and drop), pick the version and the sampling settings, and restore: a progress
bar follows the sampling steps of each photo and stage; the result appears beside its input on a before/after
slider, its intermediates (I_reg or I_ir, pose map, I_attn, depth, normal, I_res) in a gallery, and the PNG behind a
download button. With several photos, "photo" picks the one shown. Problems with an upload (not an image, too
small, too large, no person found) appear in the message box; the others are still restored.

Gradio is the convention of restoration demos (DiffBIR, SUPIR, CodeFormer). What it is told here keeps the page on
localhost: analytics off (`GRADIO_ANALYTICS_ENABLED`, set by `diffbody serve` before gradio is imported, and
`analytics_enabled=False`), fonts from the system or gradio's own static files (no Google Fonts), no server-side
rendering (no Node process), no share link, no monitoring or MCP endpoints. The queue runs one request at a time
(the service's lock is the second guard).
"""

from __future__ import annotations

import contextvars
import dataclasses
import os

import gradio as gr
from gradio.utils import get_upload_folder, is_in_or_equal

from diffbody_jax.pipelines.restore import FITS, PRESET_STEPS, SAMPLERS, RestoreSettings
from diffbody_jax.serving.service import MAX_UPLOAD_BYTES, RestoreService, Upload, message_for

SIZES = (64, 128, 256, 512, 768, 1024)
COLOURS = ("none", "adain", "wavelet")
QUEUE_SIZE = 16  # requests waiting beyond the running one; later ones are told the queue is full
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
SYSTEM_MONO = ("ui-monospace", "Consolas", "monospace")


@dataclasses.dataclass(frozen=True)
class PageDefaults:
    """The settings the page opens with (`diffbody serve`'s flags)."""

    version: str = "v1"
    size: int = 512
    sampler: str = "ddpm"
    steps: int | None = None  # None: the paper's preset of the version
    seed: int = 0
    guidance: float = 0.0  # v1's part-loss guidance scale s
    weights_label: str | None = None  # how the page names the weights (default: the folder's name)


def _messages(lines: list[str], restored: int, settings: RestoreSettings, seed: int) -> str:
    s = settings
    what = (f"{s.version}, {s.sampler} {s.num_steps} steps, CFG {s.cfg:g}, guidance {s.guidance:g}, seed {seed}, "
            f"size {s.size}, fit {s.fit}, colour {s.colour}")
    head = f"Restored {restored} photo{'s' if restored != 1 else ''} ({what})." if restored else "Nothing restored."
    return "\n".join([head, *(f"- {line}" for line in lines)])


def _view(photo) -> tuple:
    """(slider, gallery, download) updates for one RestoredPhoto: files in the service's folder, which lies in
    gradio's cache folder, so gradio serves them without copies and they go when the session ends."""
    gallery = [(str(path), label) for label, path in photo.intermediates]
    return (str(photo.before_png), str(photo.download)), gallery, gr.update(value=str(photo.download), interactive=True)


def build_page(service: RestoreService, defaults: PageDefaults = PageDefaults()) -> gr.Blocks:
    """The page (module docstring); `service` restores, `defaults` fills the controls. The service's folder must
    lie in gradio's cache folder (GRADIO_TEMP_DIR), where gradio serves files without copying them: a session's
    files are then only in the service's session folder and gradio's copy of each upload, both deleted when the
    session ends."""
    if not is_in_or_equal(service.root, get_upload_folder()):
        raise ValueError(f"the service's folder {service.root} is outside gradio's cache folder "
                         f"{get_upload_folder()}: create it under GRADIO_TEMP_DIR")
    uploads_by_session: dict[str, list[str]] = {}

    def restore(files, version, prompt, sampler, steps, cfg, guidance, seed, size, fit, colour,
                request: gr.Request, progress=gr.Progress()):  # noqa: B008 - gradio injects it by default
        session = request.session_hash or "anonymous"
        files = [f if isinstance(f, str) else f.name for f in (files or [])]
        uploads_by_session.setdefault(session, []).extend(files)
        empty = (None, [], gr.update(value=None, interactive=False), gr.update(choices=[], value=None), [])
        if not files:
            return ("Upload a photo first (drag it onto the upload box).", *empty)
        try:
            settings = RestoreSettings(version=version, steps=int(steps), sampler=sampler, cfg=float(cfg),
                                       guidance=float(guidance) if version == "v1" else 0.0, colour=colour,
                                       size=int(size), fit=fit)
            seed = int(seed)
        except (TypeError, ValueError) as e:  # an emptied number box arrives as None
            return (f"Settings: {e}", *empty)
        num_steps = settings.num_steps

        # the steps are reported from XLA's host-callback thread, where gradio's request context (which the
        # progress bar reads) is not set: each report runs in a copy of this thread's context
        context = contextvars.copy_context()

        def on_step(photo, photos, stage, step):
            context.run(progress, (step + 1) / num_steps,
                        desc=f"photo {photo + 1}/{photos}, stage {stage}: step {step + 1}/{num_steps}")

        progress(0, desc="loading the models and compiling (first request of these settings and this size)")
        try:
            result = service.restore(session, [Upload(f, f.replace("\\", "/").rsplit("/", 1)[-1]) for f in files],
                                     settings, seed=seed, prompt=(prompt or "").strip() or None, progress=on_step)
        except Exception as e:  # noqa: BLE001 - the page must keep working: the error becomes the message
            return (f"Restore failed: {message_for(e)}", *empty)
        text = _messages(result.messages, len(result.photos), settings, seed)
        if not result.photos:
            return (text, *empty)
        names = [p.name for p in result.photos]
        return (text, *_view(result.photos[0]), gr.update(choices=names, value=names[0]), result.photos)

    def show(name, photos):
        for photo in photos or []:
            if photo.name == name:
                return _view(photo)
        return None, [], gr.update(value=None, interactive=False)

    def end_session(request: gr.Request):
        session = request.session_hash or "anonymous"
        service.end_session(session)
        for path in uploads_by_session.pop(session, []):  # gradio's own copy of each upload, and its folder
            try:
                os.remove(path)
                os.rmdir(os.path.dirname(path))
            except OSError:  # gone already, or the folder holds another session's upload of the same file
                pass

    preset = PRESET_STEPS[defaults.version]
    with gr.Blocks(title="DiffBody: restore photos of people", analytics_enabled=False,
                   delete_cache=(600, 3600)) as page:
        weights = defaults.weights_label or f"`{service.weights.name}`"
        gr.Markdown(f"## DiffBody: restore photos of people\nWeights: {weights}. Uploads up to "
                    f"{MAX_UPLOAD_BYTES // 2**20} MB each; they are deleted when this tab closes.")
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="photos (drop one or several)", file_count="multiple", file_types=["image"],
                                type="filepath", elem_id="uploads")
                version = gr.Radio(["v1", "v2"], value=defaults.version, label="version", elem_id="version")
                prompt = gr.Textbox(label="prompt", placeholder="empty: the model's training prompt", lines=1,
                                    elem_id="prompt")
                with gr.Row():
                    sampler = gr.Dropdown(sorted(SAMPLERS), value=defaults.sampler, label="sampler",
                                          elem_id="sampler")
                    steps = gr.Number(defaults.steps or preset, label="steps", precision=0, minimum=1, maximum=1000,
                                      elem_id="steps")
                with gr.Row():
                    cfg = gr.Number(1.0, label="CFG scale (1: off)", minimum=0, maximum=30, elem_id="cfg")
                    guidance = gr.Number(defaults.guidance, label="part-loss guidance s (v1)", minimum=0,
                                         elem_id="guidance")
                    seed = gr.Number(defaults.seed, label="seed", precision=0, elem_id="seed")
                with gr.Row():
                    size = gr.Dropdown(list(SIZES), value=defaults.size, label="size", elem_id="size")
                    fit = gr.Radio(list(FITS), value="bucket", label="fit", elem_id="fit")
                    colour = gr.Radio(list(COLOURS), value="none", label="colour fix", elem_id="colour")
                run = gr.Button("Restore", variant="primary", elem_id="restore")
            with gr.Column(scale=2):
                messages = gr.Markdown("Upload a photo and press Restore.", elem_id="messages")
                slider = gr.ImageSlider(label="before / after", type="filepath", interactive=False, elem_id="slider")
                view = gr.Dropdown([], label="photo", elem_id="view")
                gallery = gr.Gallery(label="intermediates", columns=6, height="auto", interactive=False,
                                     elem_id="intermediates")
                download = gr.DownloadButton("Download PNG", interactive=False, elem_id="download")
        photos = gr.State([])

        version.change(lambda v: PRESET_STEPS[v], version, steps)
        run.click(restore, [files, version, prompt, sampler, steps, cfg, guidance, seed, size, fit, colour],
                  [messages, slider, gallery, download, view, photos], concurrency_limit=1)
        view.change(show, [view, photos], [slider, gallery, download])
        page.unload(end_session)
    return page


def launch(page: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, block: bool = True):
    """Serves the page on host:port (None: gradio's first free port from 7860); one request runs at a time."""
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO)
    page.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return page.launch(server_name=host, server_port=port, share=False, max_file_size=MAX_UPLOAD_BYTES,
                       ssr_mode=False, enable_monitoring=False, mcp_server=False, pwa=False, footer_links=[],
                       theme=theme, prevent_thread_lock=not block, quiet=False)
