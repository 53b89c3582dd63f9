"""transfer: teach a frozen pretrained image network new classes. A thin CLI over `pipeline`.

It parses arguments, calls the library, and prints; every failure is one line and a non-zero
exit code (the traceback only with --debug).
"""

from __future__ import annotations

import errno
import os
import shlex
import signal
import sys
import threading
import traceback
import warnings

import click
import tqdm

import pipeline  # light: its names load on first use, so `transfer --help` imports no torch
from pipeline.devices import this_process
from pipeline.errors import TransferError
from pipeline.files import default_run_dir, terminal_text

DEBUG_FLAG = "--debug"


def _echo(text: str = "", err: bool = False) -> None:
    """click.echo of text that may hold names from outside: bytes that are not UTF-8 shown as \\xNN
    and control characters as \\x1b etc. (never an encoding error, never a terminal escape sequence)."""
    click.echo(terminal_text(text), err=err)


def _echo_all(lines: list[str], err: bool = False) -> None:
    for line in lines:
        _echo(line, err=err)


def _command_line() -> str:
    """The command as the user typed it, for "resume with: ..." messages."""
    script = sys.argv[0]
    prog = ["python", script] if script.endswith("cli.py") else ["transfer"]
    return shlex.join(prog + click.get_current_context().find_root().obj["argv"])


def _version(ctx: click.Context, param, value: bool) -> None:
    """--version: this package's version and those of the libraries that shape its results."""
    if value and not ctx.resilient_parsing:
        _echo(pipeline.version_line())
        ctx.exit(0)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors (works anywhere on the line).")
@click.option("--version", is_flag=True, is_eager=True, expose_value=False, callback=_version,
              help="Show the version of transfer and of torch, torchvision, timm and scikit-learn, and exit.")
def cli(debug: bool) -> None:
    """Transfer learning with a frozen backbone: extract features once, fit a new last layer, export."""


@cli.command()
@click.argument("image_dir", required=False, type=click.Path(path_type=str))
@click.option("--out", "out", required=True, type=click.Path(path_type=str),
              help="Cache file to write (HDF5), e.g. cache/photos.h5.")
@click.option("--manifest", default=None, type=click.Path(path_type=str),
              help="A .csv or .jsonl listing path,label[,split] (header required) instead of IMAGE_DIR.")
@click.option("--backbone", default="vgg16", show_default=True,
              help="A torchvision model by name (resnet18, vit_b_16, ...), timm:<model>[.<tag>], or "
                   "efficientnet_lite0; `transfer backbones` lists them.")
@click.option("--weights", default=None,
              help="Torchvision weights name (default: the backbone's ImageNet weights; timm: the tag's), "
                   "a state_dict file, or 'random'.")
@click.option("--layer", default=None, metavar="MODULE",
              help="Take globally pooled features from this module (as in named_modules(); "
                   "`transfer backbones --layers MODEL` lists them) [default: the penultimate layer].")
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True,
              help="flip: each embedding is the mean of the image's and its mirror image's.")
@click.option("--batch-size", type=int, default=None,
              help="Images per forward pass [default: 256 on GPU; on CPU chosen by a short probe, remembered per machine].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--precision", default="auto", show_default=True,
              help="auto, fp32, bf16 or fp16. auto: bf16 on GPU and on CPUs that compute bf16 natively, else fp32; "
                   "fp32 for bit-reproducible features. Features are stored as float32.")
@click.option("--decode", default="auto", show_default=True,
              help="pil, torch or auto. torch: JPEGs decoded (decode_jpeg), resized and cropped on the extraction "
                   "device; auto: torch on GPU, pil on CPU (faster there).")
@click.option("--workers", type=int, default=None, help="Image decoding processes [default: 0 (inline) on a small CPU, up to 8 with a GPU].")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing cache (or unfinished one) made with other settings or of other files, "
                   "recomputing every image; without it, a cache of the same settings is updated. One that holds "
                   "exactly this extraction is kept (finished) or resumed (unfinished).")
@click.option("--check-content", is_flag=True,
              help="When updating a cache, tell unchanged files by their content hash (reads every file) "
                   "instead of their size and modification time.")
@click.option("--retry-failed", is_flag=True,
              help="Run the images the cache lists as failed through the network again (after fixing them), "
                   "even if their size and modification time did not change.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --weights random.")
@click.option("--preprocessing", default=None, metavar="KEY=VALUE,...",
              help="Replace (some of) the backbone's preprocessing, e.g. resize=256,crop=224,interpolation=bilinear,"
                   "mean=0.485/0.456/0.406,std=0.229/0.224/0.225 (also resize_mode=shorter|squash) "
                   "[default: the weights' own; for a file, the published checkpoint it matches].")
@click.option("--webdataset", "shards", multiple=True, metavar="[SPLIT=]SHARDS",
              help="WebDataset tar shards instead of IMAGE_DIR, e.g. 'shards/{000000..000099}.tar' (brace ranges and "
                   "{a,b}; repeatable; SPLIT= (train, val, test) gives the split of a shard list). Read without "
                   "unpacking; resumable; under torchrun each rank reads whole shards.")
@click.option("--label-key", default="cls", show_default=True, metavar="EXT|json:FIELD",
              help="With --webdataset: a sample's label is the text of its member KEY.EXT, or FIELD of KEY.json.")
@click.option("--split-key", default=None, metavar="EXT|json:FIELD",
              help="With --webdataset: a sample's split (train, val or test), like --label-key.")
def extract(image_dir, out, manifest, backbone, weights, layer, tta, batch_size, device, precision, decode, workers,
            overwrite, check_content, retry_failed, seed, preprocessing, shards, label_key, split_key):
    """Run a frozen pretrained network once over IMAGE_DIR and cache its penultimate features.

    IMAGE_DIR holds one folder per class (IMAGE_DIR/CLASS/*.jpg), optionally under split
    folders (IMAGE_DIR/{train,val,test}/CLASS/*.jpg); or --manifest lists the images. An
    interrupted run resumes when rerun; rerun on a changed folder, only new and changed images
    go through the network.
    """
    summary = pipeline.extract(
        image_dir, out, backbone=backbone, weights=weights, layer=layer, tta=tta, batch_size=batch_size, device=device,
        precision=precision, decode=decode, workers=workers, overwrite=overwrite, seed=seed, command=_command_line(),
        manifest=manifest, check_content=check_content, retry_failed=retry_failed, preprocessing=preprocessing,
        webdataset=list(shards) or None, label_key=label_key, split_key=split_key, progress=True)
    _echo_all(summary.lines())


@cli.command()
@click.argument("parts", metavar="PART.h5...", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--out", "out", required=True, type=click.Path(path_type=str), help="The merged cache to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file at --out.")
def merge(parts, out, overwrite):
    """Join caches of one extraction (parts written by engine workers, or caches of subsets) into one.

    The rows come out in the order `transfer extract` writes them, as if one extraction had run;
    parts extracted differently (backbone, weights, preprocessing, precision, ...), of another
    image folder, or holding the same file are refused.
    """
    merged = pipeline.merge_caches(list(parts), out, overwrite=overwrite, progress=True)
    _echo(f"merged {len(parts)} parts: {merged.n} images, {len(merged.failed)} failed, "
          f"{len(merged.classes)} classes -> {merged.path}")


class _CValue(click.ParamType):
    """`auto` or a number (its sign is checked by the library, which says what was wrong)."""

    name = "auto|VALUE"

    def convert(self, value, param, ctx):
        if isinstance(value, float) or value is None:
            return value
        if str(value).lower() == "auto":
            return None
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is neither 'auto' nor a number", param, ctx)


def _fit_options(f):
    """The options that set how the head is fitted (`experiment` takes them as grids)."""
    for option in reversed([
        click.option("--class-weight", default="none", show_default=True,
                     help="none or balanced (weights classes inversely to their frequency)."),
        click.option("--max-iter", type=int, default=1000, show_default=True, help="lbfgs iteration limit per fit."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for splits and solvers."),
        click.option("--normalize", default="standard", show_default=True, help="standard, l2 or none."),
        click.option("--pca", type=int, default=None, help="Reduce features to this many PCA dimensions first."),
        click.option("--train-fraction", type=float, default=1.0, show_default=True,
                     help="Use a stratified fraction of the train and val images (a learning-curve point)."),
        click.option("--repeat", type=int, default=0, show_default=True,
                     help="Which stratified subsample for --train-fraction below 1 (learning curves)."),
        click.option("--C-selection", "C_selection", default="auto", show_default=True,
                     help="How --C auto is chosen: validation (the val split), cv (k-fold on train+val), or auto "
                          "(cv when the val split has fewer than 20 images of some class)."),
        click.option("--solver", default="auto", show_default=True,
                     help="sklearn (in memory), streamed (L-BFGS over blocks read from the cache: any size, GPU, "
                          "torchrun) or auto (sklearn where its float64 features fit comfortably in memory)."),
        click.option("--device", default="auto", show_default=True,
                     help="Where the streamed solver computes: auto (a GPU when there is one), cpu or cuda."),
        click.option("--calibrate", default="temperature", show_default=True,
                     help="temperature: scale the logits by one temperature fitted on held-out predictions (the val "
                          "split, or cross-validation), folded into the head; none: the probabilities as fitted."),
        click.option("--select", default="top1", show_default=True,
                     help="What chooses --C auto: top1 (val top-1, ties: log-loss; the published protocol) or "
                          "logloss (val log-loss)."),
        click.option("--hold-out", "hold_out", default="auto", show_default=True,
                     help="auto: the test split scores the head; val (caches without a test split): the whole val "
                          "split scores it, and C, the temperature and the model use the train images only."),
    ]):
        f = option(f)
    return f


@cli.command()
@click.argument("cache_files", metavar="CACHE.h5...", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--out", "run_dir", type=click.Path(path_type=str), default=None,
              help="Run folder to write [default: reports/<cache name>-<timestamp>].")
@click.option("--C", "C", type=_CValue(), default="auto", show_default=True,
              help="Inverse regularisation strength, or auto: chosen on the validation split.")
@_fit_options
@click.option("--export/--no-export", default=True, show_default=True,
              help="Also write head.pt and the TorchScript model.pt (runs the backbone on a few images).")
@click.option("--format", "formats", multiple=True, type=click.Choice(["torchscript", "onnx", "pt2", "all"]),
              help="Model format(s) to export; repeatable [default: torchscript; for a cache that records no backbone, "
                   "head.pt alone].")
@click.option("--skip-image-parity", is_flag=True,
              help="Skip the export's check of the model on original images (for photos edited since extraction); "
                   "the checks on cached features still run.")
def fit(cache_files, run_dir, C, class_weight, max_iter, seed, normalize, pca, train_fraction, repeat, C_selection,
        solver, device, calibrate, select, hold_out, export, formats, skip_image_parity):
    """Fit the new last layer (logistic regression) on a feature cache; no network is run.

    With --C auto, C is chosen on the validation split only (coarse-to-fine over 1e-6..1e5),
    the model is refit on train+val and scored on test when there is one. Under torchrun
    (--solver streamed or auto) the ranks share the rows and rank 0 writes the run folder.
    Several caches of one extraction (parts, e.g. part-*.h5) are read as one, without merging.
    """
    cache_file = cache_files[0] if len(cache_files) == 1 else list(cache_files)
    result = pipeline.fit(cache_file, run_dir or "auto", command=_command_line(), progress=True, C=C,
                          class_weight=class_weight, max_iter=max_iter, seed=seed, normalize=normalize, pca=pca,
                          train_fraction=train_fraction, repeat=repeat, C_selection=C_selection, solver=solver,
                          device=device, calibrate=calibrate, select=select, hold_out=hold_out)
    if not this_process().leads:  # under torchrun, rank 0 alone reports
        return
    _echo_all(result.lines())
    _echo_all([f"warning: {w}" for w in result.cautions()], err=True)
    if export:
        try:
            _export_and_report(result.run_dir, None, formats, skip_image_parity=skip_image_parity)
        except KeyboardInterrupt:
            raise _Exit(f"interrupted while exporting: the run folder {result.run_dir} is complete; "
                        f"`transfer export {result.run_dir}` writes the model", 130) from None


@cli.command(name="export")
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(path_type=str))
@click.option("--out", "model_path", type=click.Path(path_type=str), default=None,
              help="Folder to write into, or the model file for one format [default: RUN_DIR].")
@click.option("--format", "formats", multiple=True, default=("torchscript",), show_default=True,
              type=click.Choice(["torchscript", "onnx", "pt2", "all"]),
              help="model.pt (TorchScript), model.onnx (onnxruntime), model.pt2 (torch.export), or all; repeatable.")
@click.option("--weights", default=None, type=click.Path(path_type=str), metavar="FILE",
              help="The backbone's weights file, where the one recorded at extraction has moved to "
                   "(it must have the recorded sha256).")
@click.option("--skip-image-parity", is_flag=True,
              help="Skip the export's check of the model on original images (for photos edited since extraction); "
                   "the checks on cached features still run.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16"]),
              help="The backbone's precision inside the model. auto: bf16 where the features were extracted in "
                   "bf16 and this machine computes bf16 natively (GPU, AVX-512 BF16, AMX), else fp32. "
                   "model.onnx is fp32 only.")
def export_cmd(run_dir, model_path, formats, weights, skip_image_parity, precision):
    """Write RUN_DIR/head.pt (a torch.nn.Linear state_dict) and the model (preprocessing + frozen
    backbone + new head + softmax) as model.pt, model.onnx and/or model.pt2, each checked against
    scikit-learn before it is renamed into place."""
    _export_and_report(run_dir, model_path, formats, weights, skip_image_parity, precision)


def _export_and_report(run_dir: str, model_path: str | None, formats=("torchscript",), weights=None,
                       skip_image_parity: bool = False, precision: str = "auto") -> None:
    result = pipeline.export(run_dir, model_path, formats=list(formats) or None, weights=weights,
                             skip_image_parity=skip_image_parity, precision=precision, progress=True)
    _echo_all(result.lines())
    _echo_all([f"warning: {w}" for w in result.warnings()], err=True)


@cli.command(name="predict")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=str))
@click.argument("paths", metavar="PATH...", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--out", "out", type=click.Path(path_type=str), default=None,
              help="Write predictions to a .csv or .json file instead of the terminal.")
@click.option("--top-k", type=int, default=None, help="Labels per image [default: min(3, classes)].")
@click.option("--batch-size", type=int, default=None,
              help="Images per forward pass [default: the batch size extraction probed for this backbone on this "
                   "machine, else 16].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
def predict_cmd(model_path, paths, out, top_k, batch_size, device):
    """Classify image files (or every image in folders) with a model from `transfer export`:
    model.pt (TorchScript), model.onnx (onnxruntime) or model.pt2 (torch.export), by its suffix."""
    results = pipeline.predict(model_path, list(paths), top_k=top_k, batch_size=batch_size, out=out, device=device,
                               progress=True)
    from pipeline.shipping.predict import failures, model_failed  # torch is loaded by now

    errors = sum(r.error is not None for r in results)
    what = failures([r.error for r in results])
    if out:
        _echo(f"wrote {len(results)} predictions to {out} ({what or '0 errors'})")
    else:
        names = [terminal_text(r.path) for r in results]  # as _echo shows them: the columns line up
        width = min(60, max(len(n) for n in names))
        for r, name in zip(results, names):
            shown = r.error and f"error: {r.error}" or "  ".join(f"{l} {p:.3f}" for l, p in zip(r.labels, r.probabilities))
            _echo(f"{name:<{width}}  {shown}")
        if errors:
            _echo(f"{errors} of {len(results)} files were not classified: {what}")
    if errors == len(results):
        by_model = [r.error for r in results if model_failed(r.error)]
        if not by_model:
            raise _Exit(f"none of the {len(results)} files could be read as an image", 1)
        raise _Exit(f"none of the {len(results)} files was classified ({what}); e.g. {by_model[0]}", 1)


@cli.command()
@click.option("--workdir", default="cache/demo", show_default=True, type=click.Path(path_type=str),
              help="Where the demo images and feature cache go.")
@click.option("--per-class", type=int, default=None, hidden=True,
              help="At most this many images per class and split (a quick check of the demo itself).")
@click.pass_context
def demo(ctx, workdir, per_class):
    """The whole pipeline on the embedded default, offline: scikit-learn's digits as images,
    features from the pretrained EfficientNet-Lite0, a fitted head, an exported model."""
    from pipeline.demo import write_digits  # scikit-learn's digits, read only when the demo runs

    images = os.path.join(workdir, "digits" if per_class is None else f"digits-{per_class}")
    counts = write_digits(images, per_class=per_class)
    _echo(f"images: {images} ({counts['train']} train, {counts['val']} val, {counts['test']} test; "
          "scikit-learn's 8x8 digits)")
    cache_file = images + ".h5"
    ctx.invoke(extract, image_dir=images, out=cache_file, backbone="efficientnet_lite0")
    run_dir = default_run_dir("demo-digits")
    ctx.invoke(fit, cache_files=(cache_file,), run_dir=run_dir)
    _echo("")
    _echo(f"results: {run_dir}/report.md (scores, confusion_matrix.png, c_sweep.png), "
          f"{run_dir}/model.pt (TorchScript model)")
    # Absolute paths, so that the line works from any folder.
    script = os.path.abspath(sys.argv[0]) if os.sep in sys.argv[0] else sys.argv[0]
    program = shlex.join(["python", script] if script.endswith("cli.py") else [script])
    _echo(f"try it:  {program} predict {shlex.quote(os.path.abspath(run_dir))}/model.pt "
          f"{shlex.quote(os.path.abspath(images))}/test/7")


@cli.command()
@click.argument("caches", metavar="CACHE.h5...", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2",
              help="Values to try: C (numbers or auto), class_weight, normalize, pca (numbers or none). Repeatable.")
@click.option("--train-fraction", "fractions", default="1.0", show_default=True,
              help="Comma-separated fractions of the labelled (train and val) images, for a learning curve.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Subsamples per fraction below 1.")
@click.option("--normalize", default="standard", show_default=True, help="standard, l2 or none (unless in --grid).")
@click.option("--pca", type=int, default=None, help="PCA dimension (unless in --grid).")
@click.option("--jobs", type=int, default=None, help="Parallel runs [default: CPU cores, at most 4].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-iter", type=int, default=1000, show_default=True)
@click.option("--solver", default="auto", show_default=True, help="sklearn, streamed or auto (as in `fit`).")
@click.option("--out", "out_dir", type=click.Path(path_type=str), default=None,
              help="Folder to write [default: reports/experiments-<timestamp>].")
def experiment(caches, grid, fractions, repeats, normalize, pca, jobs, seed, max_iter, solver, out_dir):
    """Try many heads and settings on cached features only: the network is never run.

    Several caches of the same images (other backbones or layers) are compared in one table.
    """
    request = pipeline.ExperimentRequest.from_text(
        caches, grid, fractions, normalize, pca, repeats=repeats, seed=seed, jobs=jobs, max_iter=max_iter,
        solver=solver, out=out_dir or "auto", command=_command_line())
    _echo_all(pipeline.run_experiment(request, progress=True).lines())


@cli.command(name="inspect")
@click.argument("cache_file", metavar="CACHE.h5", type=click.Path(path_type=str))
@click.option("--out", "out_dir", type=click.Path(path_type=str), default=None,
              help="Folder to write inspect.html and map.png [default: reports/inspect-<cache name>-<time>].")
@click.option("--threshold", type=float, default=None,
              help="Cosine similarity (mean-centred features) above which two images are the same picture "
                   "[default: 0.8, measured on real photos].")
@click.option("--C", "C", type=_CValue(), default="auto", show_default=True,
              help="Regularisation of the head cross-validated to find suspect labels; auto: the C `transfer fit` "
                   "chooses (so both list the same suspects).")
@click.option("--top", type=int, default=24, show_default=True,
              help="Suspect labels shown on the page (all of them are in label_issues.csv).")
@click.option("--seed", type=int, default=0, show_default=True, help="fit's --seed: its splits and folds.")
def inspect_cmd(cache_file, out_dir, threshold, C, top, seed):
    """A first look at a cache, no fit needed: leaks across splits, duplicate files, suspect labels,
    a map of the data and the class balance, as one page (inspect.html) and label_issues.csv."""
    found = pipeline.inspect(cache_file, out_dir or "auto", threshold=threshold, C=C, top=top, seed=seed,
                             progress=True)
    _echo_all(found.lines())
    _echo_all([f"warning: {w}" for w in found.warnings], err=True)


@cli.command(name="evaluate")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=str))
@click.argument("data", metavar="DATA", type=click.Path(path_type=str))
@click.option("--out", "out_dir", type=click.Path(path_type=str), default=None,
              help="Folder to write metrics.json, predictions.csv, report.html and the plots "
                   "[default: reports/evaluate-<model folder>-<time>].")
@click.option("--split", default=None, help="Only this split (train, val or test) of a DATA with split folders or column.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
def evaluate_cmd(model_path, data, out_dir, split, batch_size, device):
    """Score a model (model.pt, model.onnx or model.pt2) on labelled images: DATA is a folder with
    one subfolder per class (or train/val/test folders of them), or a .csv/.jsonl manifest
    (path,label[,split]). Prints top-1, balanced accuracy, log-loss and ECE; writes per-class
    scores, the confusion matrix, predictions.csv and a page of the worst errors."""
    found = pipeline.evaluate(model_path, data, out_dir or "auto", split=split, batch_size=batch_size, device=device,
                              progress=True)
    _echo_all(found.lines())
    _echo_all([f"warning: {w}" for w in found.warnings], err=True)


@cli.command(name="backbones")
@click.argument("names", metavar="[NAME...]", nargs=-1)
@click.option("--source", type=click.Choice(["builtin", "torchvision", "timm"]), default=None,
              help="Only this source [default: all].")
@click.option("--filter", "text", default=None, metavar="TEXT", help="Only names containing TEXT (any case).")
@click.option("--sort", type=click.Choice(["name", "top1", "params", "gflops"]), default="name", show_default=True,
              help="top1: most accurate first; params, gflops: smallest first (unknown values last).")
@click.option("--layers", "layers_of", default=None, metavar="MODEL",
              help="Instead, the layers of MODEL that --layer accepts, one per line: module path, feature dim, "
                   "pooling, and 'default' on the one whose features are used without --layer.")
@click.option("--bench", is_flag=True,
              help="Instead, time each backbone NAME on this machine: images/s of the network at --precision "
                   "(a short run with random weights: nothing is downloaded).")
@click.option("--device", default="auto", show_default=True, help="--bench: auto, cpu or cuda[:N].")
@click.option("--precision", default="auto", show_default=True,
              help="--bench: auto (what extract would choose), fp32, bf16 or fp16.")
@click.option("--batch-size", type=int, default=None, help="--bench: images per batch [default: 16 on CPU, 64 on GPU].")
@click.option("--seconds", type=float, default=5.0, show_default=True, help="--bench: timed seconds per backbone.")
def backbones_command(names, source, text, sort, layers_of, bench, device, precision, batch_size, seconds):
    """List the names --backbone accepts, to choose one: feature dim, parameters and GFLOPs (multiply-adds
    per image) of the network extract runs, ImageNet top-1 (%) where torchvision publishes it, and whether
    the weights are here (cached, packaged, download, none: random only); or time some (--bench NAME...)."""
    if bool(names) != bench:
        raise click.UsageError("--bench needs the backbones to time, e.g. transfer backbones --bench resnet50 "
                               "efficientnet_lite0" if bench else f"NAME ({names[0]}) is for --bench; to list "
                               "some, use --filter TEXT")
    if bench:
        _echo_all(pipeline.bench_backbones(names, device=device, precision=precision, batch_size=batch_size,
                                           seconds=seconds, progress=True).lines())
        _echo("(the network alone; extract also decodes and resizes each photo)", err=True)
    elif layers_of:
        header, *rows = pipeline.list_layers(layers_of).lines(layers_of)
        _echo(header, err=True)
        _echo_all(rows)
    else:
        entries = pipeline.list_backbones(source, text, progress=True, sort=sort)
        if not entries:
            raise _Exit(f"no backbone name contains {text!r}" + (f" in {source}" if source else ""))
        _echo_all(entries.lines())


class _Exit(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM, like Ctrl-C: clean up temporaries and say what was kept


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI; turn every failure into one line on stderr and an exit code."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminated)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with warnings.catch_warnings():
            if DEBUG_FLAG not in argv:
                # Library warnings (matplotlib's missing glyphs, scikit-learn, torch) are noise on a terminal,
                # and print names unescaped: what matters the library says itself. --debug shows them.
                warnings.simplefilter("ignore")
            _run(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str]) -> None:
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        cli.main(args=argv, prog_name="transfer", standalone_mode=False, obj={"argv": argv})
    except click.exceptions.NoArgsIsHelpError as e:
        _echo(e.ctx.get_help() if e.ctx else str(e))
        sys.exit(0)
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        _fail(f"{e.format_message()}{hint}", 2, debug)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code, debug)
    except click.exceptions.Abort as e:  # click turns Ctrl-C into Abort; the library's Interrupted says what was kept
        cause = e.__cause__
        _fail(str(cause) if isinstance(cause, KeyboardInterrupt) and str(cause) else "aborted", 130, debug)
    except _Exit as e:
        _fail(str(e), e.code, debug)
    except KeyboardInterrupt as e:
        _fail(str(e) or "interrupted", 130, debug)
    except OSError as e:  # a destination that cannot be written: read-only, full, no permission
        _fail(f"{_rank_prefix()}{_os_error_line(e)}", 1, debug)
    except Exception as e:  # noqa: BLE001 - the one place that turns anything into one line
        if isinstance(e, TransferError):
            _fail(str(e), 1, debug)  # under torchrun the library's message already names the rank
        _fail(f"{_rank_prefix()}unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)", 1, debug)


def _os_error_line(e: OSError) -> str:
    where = f" ({os.fsdecode(e.filename)})" if e.filename else ""
    advice = {errno.ENOSPC: "free some space and rerun", errno.EROFS: "write somewhere writable (--out)",
              errno.EACCES: "check the permissions, or write somewhere else (--out)",
              errno.EDQUOT: "free some space and rerun"}.get(e.errno, "rerun with --debug for the traceback")
    return f"cannot complete: {e.strerror or e}{where}; {advice}"


def _rank_prefix() -> str:
    place = this_process()
    return "" if place.world_size <= 1 else f"rank {place.rank} of {place.world_size}: "


def _fail(message: str, code: int, debug: bool) -> None:
    for bar in list(getattr(tqdm.tqdm, "_instances", ())):  # a bar the failure left open: the error on its own line
        bar.close()
    if debug:
        traceback.print_exc()
    _echo(f"error: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
