"""A web page to try the detector: drop one or more images and see, for each, its verdict (REAL / FAKE), its
p-value, its score against the threshold, and its heatmap (the input as the model sees it, its reconstruction
and the error map). Built with Gradio; a Hugging Face Space runs it as it stands (docs/app.md: what to upload).

    pip install -r requirements.txt -r requirements-app.txt
    python demo.py                  # once: trains and calibrates the demo model into demo_output/
    python app.py                   # then open http://127.0.0.1:7860
    python app.py --checkpoint runs/cifar10/model_best_checkpoint.ckpt --thresholds runs/cifar10/thresholds_calibrated.json
    python app.py --checkpoint CKPT --coding-model runs/coding/model_best_checkpoint.ckpt --host 0.0.0.0 --port 8080
    python app.py --checkpoint model.onnx --runtime openvino      # export.py's file, on the CPU

Images are decoded and scored exactly as inference_example.py does it (Detector.score_paths on the uploaded file).
The score measures how unlike the training and calibration images an image is: it is not a reliable detector of
modern generated images (README, "What it is, and what it is not").
"""

import base64
import html
import sys
import tempfile
import traceback
from pathlib import Path

import thresholds as thresholds_file
from detector import ARTIFACT_WEIGHTS, SCORES, Detector, add_device_flags, check_device_flags
from utils import ArgumentParser, UserError, number, run_cli

DEMO_CHECKPOINT = Path("demo_output/model/model_best_checkpoint.ckpt")  # what `python demo.py` writes
DEMO_THRESHOLDS = Path("demo_output/thresholds_calibrated.json")
THRESHOLD_NAMES = ("strict", "balanced", "sensitive")
MAX_IMAGES = 24  # per request: each one costs a heatmap figure
MAX_FILE_SIZE = "50mb"  # larger uploads are refused by the server before they reach the decoder

ABOUT = """
**What the score means.** The autoencoder learned to reconstruct its training images. An image it
reconstructs badly is unlike them, so the reconstruction error is an *anomaly* score: it measures how
unlike the training and calibration images an image is. FAKE means "more unusual than the chosen threshold
allows for real images like the calibration ones"; the p-value is the share of real calibration images that
scored at least as unusual (small = unusual).

**What it cannot detect.** This is not a trained deepfake classifier, and it is **not a reliable detector of
modern generated images**: images from current generators or super-resolution networks often score like real
photos, and smooth, blurred or heavily compressed images pass as real under the `mse` score. Real photos unlike
the calibration images can be flagged: the false-positive rate only holds for images like those. See the
README, "What it is, and what it is not".
"""

SCORE_HELP = ("mse: the model card's; local: the worst 16x16 window; complexity: mse against PNG's cost (flags "
              "smooth images); coding: the original pixels' coding cost; artifact: the detector of generator traces "
              "(shipped weights, its own thresholds); combined: the p-values of all of them")
THRESHOLD_HELP = ("strict / balanced / sensitive: about 1% / 5% / 10% of real calibration images flagged "
                  "(for thresholds written by calibrate.py)")

STYLE = """<style>
.results .result { border: 1px solid #ccc; border-radius: 8px; padding: 8px 12px; margin: 8px 0; }
.results .verdict { font-weight: bold; padding: 1px 8px; border-radius: 4px; color: white; }
.results .verdict.FAKE { background: #c0392b; }
.results .verdict.REAL { background: #27ae60; }
.results .verdict.UNREADABLE { background: #7f8c8d; }
.results img { max-width: 100%; }
</style>"""


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    add = p.add_argument
    add("--checkpoint", default=str(DEMO_CHECKPOINT), help="train.py checkpoint, hub-layout folder or hub repo id")
    add("--thresholds", default=None, help="thresholds JSON (default: the demo's with the demo's checkpoint, else "
        "the one next to the checkpoint, else the repo's)")
    add("--coding-model", default=None, help="a coding model (train.py --preset coding), for the coding score")
    add("--artifact-model", default=ARTIFACT_WEIGHTS, help="the artifact detector, with its thresholds beside it")
    add("--host", default=None, help="address to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1; "
        "0.0.0.0 serves the local network)")
    add("--port", type=number(int, 1, 65535), default=None,
        help="port (default: $GRADIO_SERVER_PORT, else the first free one from 7860)")
    add_device_flags(add)  # --runtime onnx / openvino without --thresholds: the file beside the .onnx, else its own
    return check_device_flags(p, p.parse_args(argv))


def model_files(args):
    """(checkpoint, thresholds file or None); the demo's files must exist, with a hint of how to make them."""
    if args.checkpoint == str(DEMO_CHECKPOINT):
        missing = [str(f) for f in (DEMO_CHECKPOINT, args.thresholds or DEMO_THRESHOLDS) if not Path(f).exists()]
        if missing:
            raise UserError(f"{' and '.join(missing)} not found: run `python demo.py` first, or pass --checkpoint")
        return args.checkpoint, args.thresholds or str(DEMO_THRESHOLDS)
    if args.runtime != "torch":  # the Detector finds the calibration beside the .onnx, else the exported one
        return args.checkpoint, args.thresholds
    return args.checkpoint, args.thresholds or thresholds_file.find(args.checkpoint)


class Detectors:
    """One Detector per (score, threshold) choice, made on first use. Every verdict and p-value comes from the
    Detector API, exactly as inference_example.py gets them; all of them share the first one's weights."""

    def __init__(self, checkpoint, thresholds, coding_model=None, device="auto", runtime="torch",
                 artifact_model=ARTIFACT_WEIGHTS):
        # workers=0: a few uploads per request decode faster in this process than in freshly started workers
        self.kwargs = dict(checkpoint=checkpoint, thresholds=thresholds, coding_model=coding_model, device=device,
                           workers=0, runtime=runtime)
        # the artifact score needs no autoencoder, and decides with the thresholds beside its own weights
        self.artifact_kwargs = dict(checkpoint=None, artifact_model=artifact_model, device=device, workers=0)
        self.cache = {}
        self.first = self.get("mse", "balanced")  # a bad checkpoint or thresholds file fails here, in one line
        self.scores = [s for s in SCORES if self.usable(s)]

    def get(self, score, threshold):
        if (score, threshold) not in self.cache:
            det = Detector(score=score, threshold=threshold,
                           **(self.artifact_kwargs if score == "artifact" else self.kwargs))
            if self.cache and score != "artifact":  # same files, same weights: keep one copy in memory
                det.model, det.coding = self.first.model, self.first.coding
            self.cache[score, threshold] = det
        return self.cache[score, threshold]

    def usable(self, score):
        """Whether the thresholds file (and coding model) can decide with this score."""
        try:
            self.get(score, "balanced")
            return True
        except UserError:
            return False


def heatmap_png(row, title):
    """The row's heatmap (plots.save_heatmap, the CLI's --heatmaps picture) as PNG bytes."""
    import plots  # here: matplotlib's import is not paid by a start that fails on a bad flag or file

    with tempfile.TemporaryDirectory() as folder:
        plots.save_heatmap(row, folder, title)
        return (Path(folder) / plots.heatmap_name(row["path"])).read_bytes()


def decision(row, det):
    """The score against the threshold, in words: 'mse = 0.41 > threshold (balanced = 0.0212)'."""
    fake = row["verdict"] == "FAKE"
    if det.score_name in thresholds_file.P_VALUE_SCORES:  # decided by the p-value against a level
        shown = "combined " if det.score_name == "combined" else f"{det.score_name} = {row['score']:.4g}, "
        return f"{shown}p = {row['p_value']:.3g} {'<=' if fake else '>'} level {det.threshold:g}"
    return f"{det.score_name} = {row['score']:.4g} {'>' if fake else '<='} threshold ({det.threshold_label})"


def result_html(row, det):
    """One image's card. Everything from the upload (its name, the decoder's message) is escaped."""
    name = html.escape(Path(row["path"]).name)
    if "error" in row:
        return (f'<div class="result" data-name="{name}" data-verdict="UNREADABLE"><b>{name}</b> '
                f'<span class="verdict UNREADABLE">UNREADABLE</span>'
                f'<p class="error">could not read this file: {html.escape(row["error"])}</p></div>')
    verdict, line = row["verdict"], decision(row, det)
    p_value = "no p-value (no calibration scores)" if row.get("p_value") is None else f"p-value {row['p_value']:.3g}"
    title = f"{verdict}  ({det.score_name} {row['score']:.6g})"  # the title inference_example.py --heatmaps gives
    picture = (f'<img alt="input, reconstruction and error map of {name}" src="data:image/png;base64,'
               f'{base64.b64encode(heatmap_png(row, title)).decode()}">') if "map" in row else ""
    return (f'<div class="result" data-name="{name}" data-verdict="{verdict}"><b>{name}</b> '
            f'<span class="verdict {verdict}">{verdict}</span>'
            f'<p><span class="decision">{html.escape(line)}</span> &middot; <span class="p-value">{p_value}</span></p>'
            f'{picture}</div>')


def score_uploads(detectors, paths, score, threshold):
    """The page's results for the uploaded files: one card per image, or one line saying what went wrong."""
    if not paths:
        return '<p class="results">Drop one or more images above.</p>'
    try:
        det = detectors.get(score, threshold)
        cards = [result_html(row, det) for row in det.score_paths(paths[:MAX_IMAGES], keep_maps=True)]
    except UserError as e:  # e.g. a threshold name this thresholds file lacks
        return f'<p class="results error">{html.escape(str(e))}</p>'
    except Exception:  # a bug must not take the page down: the trace goes to the server's log only
        traceback.print_exc()
        return '<p class="results error">internal error while scoring these files (the server log has details)</p>'
    more = f"<p>only the first {MAX_IMAGES} of {len(paths)} files were scored</p>" * (len(paths) > MAX_IMAGES)
    return f'{STYLE}<div class="results">{more}{"".join(cards)}</div>'


def build_app(detectors, checkpoint):
    """The page: uploads, score and threshold choices, the files in use, what the score means, the results."""
    import gradio as gr  # here: the rest of the module (and its --help) works without gradio

    # no usage statistics sent anywhere; uploads older than a day are deleted from the server's cache
    with gr.Blocks(title="Residual autoencoder: anomaly score", analytics_enabled=False,
                   delete_cache=(3600, 86400)) as demo:
        gr.Markdown("# Residual autoencoder: how unlike the real images is this one?\n"
                    "An anomaly score, not a deepfake detector: it is not reliable on modern generated images "
                    "(see *What it cannot detect* below).")
        gr.Markdown(f"Checkpoint: `{checkpoint}`  \nThresholds: `{detectors.first.thresholds_source or 'none'}`"
                    + "".join(f"  \n**Warning:** {html.escape(w)}" for w in detectors.first.warnings))
        with gr.Row():
            files = gr.File(label="images (one or more)", file_count="multiple", type="filepath", elem_id="uploads")
            with gr.Column():
                score = gr.Radio(detectors.scores, value="mse", label="score",
                                 info=SCORE_HELP, elem_id="score")
                threshold = gr.Radio(list(THRESHOLD_NAMES), value="balanced", label="threshold",
                                     info=THRESHOLD_HELP, elem_id="threshold")
        results = gr.HTML(elem_id="results")
        gr.Markdown(ABOUT, elem_id="about")
        # one request at a time (Gradio's default queue): the model is not shared between threads
        gr.on([files.change, score.change, threshold.change], lambda *a: score_uploads(detectors, *a),
              inputs=[files, score, threshold], outputs=results)
    return demo


def main(argv=None):
    args = parse_args(argv)
    checkpoint, thresholds = model_files(args)
    detectors = Detectors(checkpoint, thresholds, args.coding_model, args.device, args.runtime, args.artifact_model)
    for w in detectors.first.warnings:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("gradio is not installed: pip install -r requirements-app.txt") from None
    except ValueError as e:  # gradio reads its GRADIO_* environment variables on import
        raise UserError(f"gradio cannot start: {e}") from None
    demo = build_app(detectors, checkpoint)
    try:
        demo.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_FILE_SIZE)
    except OSError as e:  # a port in use, an address this machine does not have
        raise UserError(f"cannot serve on {args.host or 'the default host'}:{args.port or 'the default port'}: "
                        f"{str(e).splitlines()[0]}") from None


if __name__ == "__main__":
    sys.exit(run_cli(main))
