"""A web page to try the detectors: drop images, see each one's verdict (REAL / FAKE), score and p-value
(docs/app.md). With no flags it serves the shipped artifact detector. pip install -r requirements-app.txt

    python app.py                # the shipped artifact detector alone; open http://127.0.0.1:7860
    python app.py --checkpoint runs/cifar10/model_best_checkpoint.ckpt   # + its scores, heatmaps
    python app.py --checkpoint runs/cifar10/model_best_checkpoint.ckpt --host 0.0.0.0 --port 8080
"""

import base64
import contextlib
import html
import io
import os
import sys
import tempfile
import traceback
from pathlib import Path

from PIL import ImageOps

from data import to_pil
from detector import ARTIFACT_WEIGHTS, SCORES, Detector
from images import read_image
from utils import ArgumentParser, UserError, add_model_flags, number, run_cli

MAX_IMAGES = 24  # per request: each one costs a heatmap figure or a thumbnail
MAX_FILE_SIZE = "50mb"  # larger uploads are refused by the server before they reach the decoder

HEADER = """# Does this image carry the traces of an up-sampling network?
The `artifact` score detects images made or enlarged by super-resolution and restoration networks; it was
not measured on text-to-image generators (diffusion, GAN). The autoencoder's scores are anomaly scores."""
ABOUT = """**What the scores can and cannot tell.** `artifact` was trained on the traces of up-sampling
networks (super-resolution, restoration) and measured on those only; it misses most outputs of some, e.g.
Real-ESRGAN x4plus (docs/artifact.md). It was **not measured on diffusion or GAN text-to-image outputs**. An
image generated then downscaled (a thumbnail) keeps little trace; plain bicubic or Lanczos up-scales of real
photos are often flagged. The autoencoder's scores (`--checkpoint`) are **anomaly scores, not detectors of
generated images**. p-value: the share of real calibration images scoring at least as high."""
THRESHOLD_HELP = "strict / balanced / sensitive: about 1% / 5% / 10% of real calibration images flagged"
STYLE = """<style>.results .result {border: 1px solid #ccc; border-radius: 8px; padding: 8px; margin: 8px 0}
.results .verdict {font-weight: bold; padding: 1px 8px; border-radius: 4px; color: white}
.results .FAKE {background: #c0392b} .results .REAL {background: #27ae60}
.results .UNREADABLE {background: gray} .results img {max-width: 100%}</style>"""


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    add_model_flags(p, "the autoencoder, for its scores and heatmaps (default: none): train.py checkpoint, "
                    "hub-layout folder or hub repo id",
                    "the artifact detector (default: the shipped artifact_detector/)")
    p.add_argument("--host", help="address to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1; "
                   "0.0.0.0 serves the local network)")
    p.add_argument("--port", type=number(int, 1, 65535), help="port (default: $GRADIO_SERVER_PORT, else the "
                   "first free one from 7860)")
    return p.parse_args(argv)


def load_detectors(args):
    """score -> a Detector deciding with it, for each score the loaded models can decide with. The artifact
    score decides with its own detector's thresholds; the autoencoder's scores share one copy of its weights
    (with_rule). workers=0: a few uploads decode faster in this process than in freshly started workers."""
    artifact_model = args.artifact_model or ARTIFACT_WEIGHTS  # decides with the thresholds file beside it
    dets = {"artifact": Detector(None, None if args.checkpoint else args.thresholds, args.device, "artifact",
                                 "balanced", workers=0, artifact_model=artifact_model)}
    if args.checkpoint:  # mse, balanced: a bad checkpoint or thresholds file fails here, in one line
        main = Detector(args.checkpoint, args.thresholds or "find", args.device, "mse", "balanced", workers=0,
                        artifact_model=artifact_model)  # for combined, if calibrated
        for score in SCORES.keys() - {"artifact"}:
            with contextlib.suppress(UserError):  # e.g. a score the thresholds file has no thresholds for
                dets[score] = main.with_rule(score, "balanced")
    return {score: dets[score] for score in SCORES if score in dets}


def picture(row, title):
    """PNG bytes: the row's heatmap (the CLI's --heatmaps picture), else a thumbnail (160 pixels high)."""
    if "map" in row:
        import plots  # here: matplotlib's import is not paid by a start that fails on a bad flag or file
        with tempfile.TemporaryDirectory() as folder:
            plots.save_heatmap(row, folder, title)
            return (Path(folder) / plots.heatmap_name(row["path"])).read_bytes()
    buf = io.BytesIO()
    ImageOps.contain(to_pil(read_image(row["path"], 160)), (640, 160)).save(buf, format="PNG")
    return buf.getvalue()


def result_html(row, det):
    """One image's card. Everything from the upload (its name, the decoder's message) is escaped."""
    name = html.escape(Path(row["path"]).name)
    if "error" in row:
        return (f'<div class="result" data-name="{name}" data-verdict="UNREADABLE"><b>{name}</b> '
                f'<span class="verdict UNREADABLE">UNREADABLE</span>'
                f'<p class="error">could not read this file: {html.escape(row["error"])}</p></div>')
    verdict, score, fake = row["verdict"], det.score_name, row["verdict"] == "FAKE"
    line = (f"{score} p = {row['p_value']:.3g} {'<=' if fake else '>'} level {det.threshold:g}"
            if score == "combined" else  # else e.g. 'mse = 0.41 > threshold (balanced = 0.0212)'
            f"{score} = {row['score']:.4g} {'>' if fake else '<='} threshold ({det.threshold_label})")
    p_value = "no p-value" if row.get("p_value") is None else f"p-value {row['p_value']:.3g}"
    png = picture(row, f"{verdict}  ({det.score_name} {row['score']:.6g})")  # inference_example.py's title
    return (f'<div class="result" data-name="{name}" data-verdict="{verdict}"><b>{name}</b> '
            f'<span class="verdict {verdict}">{verdict}</span>'
            f'<p><span class="decision">{html.escape(line)}</span> &middot; '
            f'<span class="p-value">{p_value}</span></p>'
            f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></div>')


def score_uploads(dets, paths, score, threshold):
    """The page's results for the uploaded files: one card per image, or one line saying what went wrong.
    Each file is decoded and scored as inference_example.py does it (Detector.score_paths)."""
    if not paths:
        return '<p class="results">Drop one or more images above.</p>'
    try:
        det = dets[score].with_rule(score, threshold)  # the same loaded models: nothing is loaded again
        cards = [result_html(row, det) for row in det.score_paths(paths[:MAX_IMAGES], keep_maps=True)]
    except UserError as e:  # e.g. a threshold name this thresholds file lacks
        return f'<p class="results error">{html.escape(str(e))}</p>'
    except Exception:  # a bug must not take the page down: the trace goes to the server's log only
        traceback.print_exc()
        return '<p class="results error">internal error while scoring these files (see the server log)</p>'
    more = f"<p>only the first {MAX_IMAGES} of {len(paths)} files were scored</p>" * (len(paths) > MAX_IMAGES)
    return f'{STYLE}<div class="results">{more}{"".join(cards)}</div>'


def build_app(dets, args):
    """The page: uploads, score and threshold choices, the files in use, what the scores mean, results."""
    import gradio as gr  # here: the rest of the module (and its --help) works without gradio
    here = os.path.join(Path.cwd(), "")  # paths in this folder are shown relative to it
    used = [("Artifact detector", args.artifact_model or "artifact_detector (shipped)", dets["artifact"])]
    used += [("Autoencoder", args.checkpoint, dets.get("mse"))] * bool(args.checkpoint)
    lines = [f"{what}: `{source}` &middot; thresholds: `{det.thresholds_source.removeprefix(here)}`"
             + "".join(f"  \n**Warning:** {html.escape(w)}" for w in det.warnings)
             for what, source, det in used]
    # no usage statistics sent anywhere; uploads older than a day are deleted from the server's cache
    with gr.Blocks(title="Up-sampling traces and anomaly scores", analytics_enabled=False,
                   delete_cache=(3600, 86400)) as demo:
        gr.Markdown(HEADER)
        gr.Markdown("  \n".join(lines))  # the files in use, and any warning that they do not fit together
        with gr.Row():
            files = gr.File(label="images", file_count="multiple", type="filepath", elem_id="uploads")
            with gr.Column():
                score = gr.Radio(list(dets), value="mse" if "mse" in dets else "artifact", label="score",
                                 info="; ".join(f"{s}: {SCORES[s]}" for s in dets), elem_id="score")
                threshold = gr.Radio(["strict", "balanced", "sensitive"], value="balanced", label="threshold",
                                     info=THRESHOLD_HELP, elem_id="threshold")
        results = gr.HTML(elem_id="results")
        gr.Markdown(ABOUT, elem_id="about")
        # one request at a time (Gradio's default queue): the models are not shared between threads
        gr.on([files.change, score.change, threshold.change], lambda *a: score_uploads(dets, *a),
              inputs=[files, score, threshold], outputs=results)
    return demo


def main(argv=None):
    args = parse_args(argv)
    dets = load_detectors(args)
    for w in dict.fromkeys(w for det in dets.values() for w in det.warnings):
        print(f"warning: {w}", file=sys.stderr, flush=True)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("gradio is not installed: pip install -r requirements-app.txt") from None
    except ValueError as e:  # gradio reads its GRADIO_* environment variables on import
        raise UserError(f"gradio cannot start: {e}") from None
    try:
        build_app(dets, args).launch(server_name=args.host, server_port=args.port,
                                     max_file_size=MAX_FILE_SIZE)
    except OSError as e:  # a port in use, an address this machine does not have
        where = f"{args.host or 'the default host'}:{args.port or 'the default port'}"
        raise UserError(f"cannot serve on {where}: {str(e).splitlines()[0]}") from None


if __name__ == "__main__":
    sys.exit(run_cli(main))
