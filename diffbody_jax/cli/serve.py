"""`diffbody serve`: a local page to restore photos in the browser (diffbody_jax/serving).

  diffbody serve [--weights DIR] [--host 127.0.0.1] [--port N] [--version v1|v2] [--size N] [--keep 2]
      [--annotator auto]

Defaults: the tiny zoo this checkout ships (`zoo/weights`, restored at 64 px), bound to localhost. The page restores
exactly as `diffbody restore PHOTO --batch 1` with the same settings and seed. Ctrl-C stops the server and deletes
every upload and result.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# before gradio is imported anywhere: no analytics or version checks (the page stays on localhost)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ZOO_SIZE = 64  # the shipped zoo trained at 64 x 64 (diffbody demo's DEMO_SIZE)
ZOO_LABEL = "the tiny zoo this checkout ships (64 px models trained here: they restore layout and tone, not detail)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="diffbody serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="weights folder (default: the shipped zoo's, zoo/weights)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default localhost only; 0.0.0.0 serves the network: no authentication)")
    p.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    p.add_argument("--version", choices=("v1", "v2"), default="v1", help="the version the page opens with")
    p.add_argument("--size", type=int, help="the size the page opens with (default 64 for the zoo, else 512)")
    p.add_argument("--keep", type=int, default=2,
                   help="loaded settings kept for reuse (each holds its own copy of the weights)")
    p.add_argument("--annotator", default="auto",
                   help="pose for uploads: auto | none | mediapipe | onnx-dwpose:det=FILE,pose=FILE")
    args = p.parse_args(argv)

    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="diffbody-serve-"))  # unpacked zoo, uploads, results: gone at exit
    try:
        return _serve(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _fail(message: str) -> int:
    print(f"diffbody serve: {message}", file=sys.stderr)
    return 1


def _serve(args, root: Path) -> int:
    from diffbody_jax.annotators import AnnotatorError
    from diffbody_jax.cli.demo import ZOO_GUIDANCE, shipped_zoo
    from diffbody_jax.cli.restore import annotator_from
    from diffbody_jax.pipelines.weights import WeightsError, check_weights
    from diffbody_jax.training.zoo import unpack_zoo

    weights, size, guidance, label = args.weights, args.size, 0.0, f"`{args.weights}`"
    try:
        if weights is None:
            zoo = shipped_zoo()
            if zoo is None:
                return _fail("no --weights given and no shipped zoo in this install (zoo/ of a source checkout)")
            weights, size, guidance = str(unpack_zoo(zoo, root / "zoo")), size or ZOO_SIZE, ZOO_GUIDANCE
            label = ZOO_LABEL
        _, needs = check_weights(weights, load=False)
        annotator, note = annotator_from(args.annotator)
    except (WeightsError, AnnotatorError, ValueError) as e:
        return _fail(str(e))
    if needs.get(args.version):
        return _fail(f"{weights}: {args.version} needs {', '.join(needs[args.version])} "
                    f"(`diffbody weights check {weights}`)")
    if note:
        print(f"note: {note}", file=sys.stderr)
    print(f"weights: {weights}", flush=True)

    # gradio's cache folder: its copy of each upload, and the service's folder (served from there without copies)
    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio")
    (root / "gradio").mkdir()
    from diffbody_jax.serving.page import PageDefaults, build_page, launch
    from diffbody_jax.serving.service import RestoreService

    try:
        service = RestoreService(weights, annotator=annotator, root=root / "gradio", keep=args.keep)
    except ValueError as e:
        return _fail(f"--keep: {e}")
    page = build_page(service, PageDefaults(version=args.version, size=size or 512, guidance=guidance,
                                            weights_label=label))
    try:
        launch(page, host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass
    finally:
        page.close()
        service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
