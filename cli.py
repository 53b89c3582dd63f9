"""transfer: teach a frozen pretrained image network new classes. A thin CLI over `pipeline`.

It parses arguments, calls the library, and prints; every failure is one line and a non-zero
exit code (the traceback only with --debug).
"""

from __future__ import annotations

import os
import shlex
import sys

import click

DEBUG_FLAG = "--debug"


def _command_line() -> str:
    """The command as the user typed it, for "resume with: ..." messages."""
    script = sys.argv[0]
    prog = ["python", script] if script.endswith("cli.py") else ["transfer"]
    return shlex.join(prog + click.get_current_context().find_root().obj["argv"])


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class _Bar:
    """tqdm progress bar (images, with a rate) behind the library's ProgressSink interface."""

    def __init__(self, desc: str, unit: str = "img"):
        self.desc, self.unit, self.bar = desc, unit, None

    def start(self, total: int, already: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=already, desc=self.desc, unit=self.unit, dynamic_ncols=True,
                        smoothing=0.1, file=sys.stderr)

    def advance(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors (works anywhere on the line).")
def cli(debug: bool) -> None:
    """Transfer learning with a frozen backbone: extract features once, fit a new last layer, export."""


@cli.command()
@click.argument("image_dir", type=click.Path(path_type=str))
@click.option("--out", "out", required=True, type=click.Path(path_type=str),
              help="Cache file to write (HDF5), e.g. cache/photos.h5.")
@click.option("--backbone", default="vgg16", show_default=True,
              help="vgg11/13/16/19[_bn], resnet50 or efficientnet_lite0.")
@click.option("--weights", default=None,
              help="Torchvision weights name (default: the backbone's ImageNet weights), a state_dict file, or 'random'.")
@click.option("--batch-size", type=int, default=None, help="Images per forward pass [default: 32 on CPU, 256 on GPU].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Compute precision [default: bf16 on GPU, fp32 on CPU]. Features are stored as float32.")
@click.option("--workers", type=int, default=None, help="Image decoding processes [default: 1 on CPU, up to 8 on GPU].")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache made with other settings.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --weights random.")
def extract(image_dir, out, backbone, weights, batch_size, device, precision, workers, overwrite, seed):
    """Run a frozen pretrained network once over IMAGE_DIR and cache its penultimate features.

    IMAGE_DIR holds one folder per class (IMAGE_DIR/CLASS/*.jpg), optionally under split
    folders (IMAGE_DIR/{train,val,test}/CLASS/*.jpg). An interrupted run resumes when rerun.
    """
    from pipeline import cache
    from pipeline.extract import ExtractRequest, run_extract

    request = ExtractRequest(image_dir=image_dir, out=out, backbone=backbone, weights=weights,
                             batch_size=batch_size, device=device, precision=precision, workers=workers,
                             overwrite=overwrite, seed=seed, command=_command_line())
    bar = _Bar("extract")
    rank = int(os.environ.get("RANK", "0"))

    def ready(info: dict) -> None:
        if rank == 0:
            resumed = f", resuming at {info['already']}/{info['total']}" if info["already"] else ""
            ranks = f", {info['world_size']} ranks" if info["world_size"] > 1 else ""
            click.echo(f"extracting {info['total']} images with {backbone} on {info['device']} "
                       f"({info['precision']}, batch {info['batch_size']}, {info['workers']} decode workers{ranks})"
                       f"{resumed}", err=True)

    try:
        summary = run_extract(request, progress=bar, on_ready=ready)
    except KeyboardInterrupt:
        bar.close()
        partial = cache.partial_path(out)
        done = ""
        if os.path.exists(partial):
            p = cache.PartialCache(partial).progress()
            done = f"{p.finished} of {p.total} images are committed in {partial}; "
        raise _Exit(f"interrupted: {done}rerun the same command to resume", 130) from None
    finally:
        bar.close()
    if rank != 0:
        return
    if summary.state == "already complete":
        click.echo(f"{out} already holds this extraction ({summary.done} images, {summary.failed} failed); "
                   "nothing to do (--overwrite to redo it)")
        return
    resumed = f" (resumed after {summary.resumed_from})" if summary.resumed_from else ""
    click.echo(f"extracted {summary.processed} images{resumed} in {summary.seconds:.1f} s, "
               f"{summary.images_per_second:.1f} img/s: {summary.done} cached, {summary.failed} failed")
    click.echo(f"cache: {out} ({_size(summary.out_bytes)})")
    if summary.skipped_files:
        click.echo(f"skipped {summary.skipped_files} files without an image extension")
    if summary.failures:
        click.echo(f"failed images (kept in the cache's 'failed' group):")
        for path, reason in summary.failures[:10]:
            click.echo(f"  {path}: {reason}")
        if len(summary.failures) > 10:
            click.echo(f"  ... and {len(summary.failures) - 10} more")


class _Exit(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI; turn every failure into one line on stderr and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        cli.main(args=argv, prog_name="transfer", standalone_mode=False, obj={"argv": argv})
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        sys.exit(0)
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        _fail(f"{e.format_message()}{hint}", 2, debug)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code, debug)
    except click.exceptions.Abort:
        _fail("aborted", 130, debug)
    except _Exit as e:
        _fail(str(e), e.code, debug)
    except KeyboardInterrupt:
        _fail("interrupted", 130, debug)
    except Exception as e:  # noqa: BLE001 - the one place that turns anything into one line
        from pipeline.errors import TransferError

        if isinstance(e, TransferError):
            _fail(_with_rank(str(e)), 1, debug)
        _fail(_with_rank(f"unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)"), 1, debug)


def _with_rank(message: str) -> str:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"rank {os.environ.get('RANK', '?')}/{os.environ['WORLD_SIZE']}: {message}"
    return message


def _fail(message: str, code: int, debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exc()
    click.echo(f"error: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
