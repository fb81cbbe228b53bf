"""The `mmval` command: argument parsing, printing and exit codes; the work is in `mmval`."""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from mmval.atomic import WRITE_ERRNOS, WriteError, write_failure
from mmval.errors import UserError
from mmval.locks import locked

if TYPE_CHECKING:
    from mmval.report.runs import RunTree
    from mmval.search import Search
    from mmval.sweep import RunOutcome

app = typer.Typer(
    help="Balanced multimodal learning and per-sample modality valuation.",
    epilog="Example: mmval quickstart (prepares data, trains, values and reports in ./)",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipe_app = typer.Typer(
    help="Check recipes, print their schema, list the methods and their settings.",
    no_args_is_help=True,
)
app.add_typer(recipe_app, name="recipe")
# emoji=False: `:x:` in a path or a message must stay as typed (`--view v=f.npz:x`)
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)
F = TypeVar("F", bound=Callable[..., object])


def _main_process() -> bool:
    """False in the torchrun processes of rank > 0, which print nothing (rank 0 speaks)."""
    return os.environ.get("RANK", "0") == "0"


def user_errors(func: F) -> F:
    """Print a user mistake, or a write the file system refused (disk full, quota, read-only:
    the file and the free space there), as one paragraph and exit 2, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            result = func(*args, **kwargs)
        except UserError as exc:
            message = str(exc)
        except OSError as exc:
            if not isinstance(exc, WriteError) and exc.errno not in WRITE_ERRNOS:
                raise
            message = write_failure(exc)
        else:
            return result
        if _main_process():
            err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def locks_out(func: F) -> F:
    """Hold the lock of the command's --out file while it runs, so that a second command writing
    the same file stops (exit 2) naming the first, instead of both writing it."""

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        out = kwargs.get("out")
        if not isinstance(out, Path):
            return func(*args, **kwargs)
        with locked(out, folder=False, what=f"output file {out}"):
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def trusts_code(func: F) -> F:
    """Let the command load checkpoints whose recipes import python encoders when its
    --trust-code flag is given (for this command only)."""

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        from mmval.models.encoders import trusting_code

        with trusting_code(bool(kwargs.get("trust_code"))):
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )


def _train_callbacks(progress: Progress) -> list:
    """Training callbacks that draw a bar per run (advanced per step, with each epoch's val
    accuracy); the engine is imported only when a command trains. The first one (`Bars`) also
    knows where the run stands, for the message of an interrupted `mmval train`."""
    from mmval.engine.loop import Callback, Fit

    class Bars(Callback):
        task: TaskID
        fit: Fit | None = None  # the run being trained
        epoch_steps: tuple[int, int] = (0, 0)  # steps taken in the current epoch, of how many

        def on_train_start(self, fit: Fit) -> None:
            self.fit, done = fit, fit.state.step  # a resumed run starts from its steps
            total = done + (fit.epochs - fit.state.epoch) * fit.steps_per_epoch
            self.task = progress.add_task(fit.title, total=total, completed=done, status="")

        def on_train_epoch_start(self, fit: Fit, steps: int) -> None:
            # the epoch's real length (copies of re-sampling methods), the later ones alike
            progress.update(
                self.task, total=fit.state.step + (fit.epochs - fit.state.epoch) * steps
            )
            self.epoch_steps = (0, steps)

        def on_train_step(self, fit: Fit) -> None:
            self.epoch_steps = (self.epoch_steps[0] + 1, self.epoch_steps[1])
            progress.advance(self.task)

        def on_epoch_end(self, fit: Fit, row: dict[str, float]) -> None:
            name, val = _headline(row, "val")
            status = f"epoch {int(row['epoch'])} val {name} {val:.3f}" if name else ""
            progress.update(self.task, status=status)

        def on_fit_end(self, fit: Fit) -> None:
            self.fit = None

        def where(self) -> str:
            """Where the run stopped and what its last.pt keeps."""
            fit = self.fit
            if fit is None:
                return "no run was training (finished runs are kept)"
            done, steps = self.epoch_steps
            at = f"after epoch {fit.state.epoch} of {fit.epochs}"
            if done and fit.state.epoch < fit.epochs:
                at = f"in epoch {fit.state.epoch + 1} of {fit.epochs}, after step {done} of {steps}"
            kept = (
                f"its last.pt holds epoch {fit.saved_epoch}"
                if fit.saved_epoch is not None
                else "no last.pt was written yet (--resume starts it from the beginning)"
            )
            return f"{fit.run_dir} stopped {at}; {kept}"

    return [Bars()]


def _headline(row: dict, split: str) -> tuple[str, float]:
    """The task's headline metric of an epoch row or a summary (its first `<split>_` entry:
    accuracy for classification, MAE for regression, ...) by name, and its value."""
    for key, value in row.items():
        if key.startswith(f"{split}_"):
            return key.removeprefix(f"{split}_"), float(value)
    return "", float("nan")


def _print_frame(frame, title: str, float_format: str = "{:.2f}", fold: bool = False) -> None:
    """A table on the terminal; `fold` wraps long cells (paths) instead of cutting them."""
    table = Table(title=title)
    for col in frame.columns:
        justify = "right" if frame[col].dtype.kind in "fiu" else "left"
        table.add_column(str(col), justify=justify, overflow="fold" if fold else "ellipsis")
    for row in frame.itertuples(index=False):
        table.add_row(*(_cell(v, float_format) for v in row))
    console.print(table)


def _cell(value: object, float_format: str) -> str:
    if isinstance(value, float):
        return "-" if value != value else float_format.format(value)
    return str(value)


def _prep_inputs(
    dataset: str,
    views: list[str] | None,
    labels: Path | None,
    ids: Path | None,
    splits: str | None,
) -> tuple[dict[str, object], str | None]:
    """The file options of `prep table` / `prep folder` as source parameters (absolute paths),
    and the --splits left for the other data sets (for `table` it names the split file)."""
    if dataset == "table":
        if not views or labels is None:
            raise UserError("mmval prep table needs --view NAME=PATH (one per view) and --labels.")
        named: dict[str, str] = {}
        for text in views:
            name, sep, path = text.partition("=")
            if not sep or not name or not path:
                raise UserError(f"--view {text!r}: write NAME=PATH (e.g. --view fac=fac.csv).")
            if name in named:
                raise UserError(f"--view {name} is given twice.")
            file, colon, key = path.partition(":")
            named[name] = str(Path(file).expanduser().resolve()) + colon + key
        inputs: dict[str, object] = {
            "views": named,
            "labels": str(labels.expanduser().resolve()),
            "ids": None if ids is None else str(ids.expanduser().resolve()),
            "split_file": None if splits is None else str(Path(splits).expanduser().resolve()),
        }
        return inputs, None
    if views or ids is not None:
        raise UserError("--view and --ids are options of `mmval prep table`.")
    if dataset == "folder":
        if labels is None:
            raise UserError("mmval prep folder needs --labels (a CSV or JSONL listing the files).")
        return {"labels": str(labels.expanduser().resolve())}, splits
    if labels is not None:
        raise UserError("--labels is an option of `mmval prep table` and `mmval prep folder`.")
    return {}, splits


@app.command()
@user_errors
def prep(
    dataset: Annotated[
        str | None,
        typer.Argument(help="data set name (see --list), table, folder, or a manifest file"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="output directory [default: data/DATASET]")
    ] = None,
    raw: Annotated[Path | None, typer.Option(help="folder with the raw data")] = None,
    workers: Annotated[
        int | None, typer.Option(help="extraction processes [default: all cores]")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="at most K clips per split")] = None,
    splits: Annotated[
        str | None,
        typer.Option(
            help="comma-separated splits to prepare; for `prep table`: a file with the split "
            "(train, val or test) of each row"
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="parameter, e.g. rows_per_shard=256")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="rebuild an existing output")] = False,
    max_failures: Annotated[
        float, typer.Option(help="exit 1 if more than this share of clips fail")
    ] = 0.1,
    clip_timeout: Annotated[
        float,
        typer.Option(min=0.001, help="seconds one clip may take before it is listed as an error"),
    ] = 300.0,
    shard_index: Annotated[
        int | None,
        typer.Option(help="prepare only part I of --num-shards, into OUT/part-IIIII-of-NNNNN"),
    ] = None,
    num_shards: Annotated[
        int | None, typer.Option(help="number of parts the prep is split into (machines, jobs)")
    ] = None,
    merge: Annotated[
        bool, typer.Option(help="merge the finished parts in OUT into one data set")
    ] = False,
    list_: Annotated[
        bool,
        typer.Option(
            "--list",
            help="list the data sets and exit; with a data set (or --verbose), its --set "
            "parameters: name, type, default, description",
        ),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="--list: every data set's --set parameters too")
    ] = False,
    raw_out: Annotated[
        Path | None, typer.Option(help="synthetic-av: where to write the raw clips")
    ] = None,
    layout: Annotated[str, typer.Option(help="synthetic-av: data set layout to imitate")] = (
        "kinetics-sounds"
    ),
    clips: Annotated[int, typer.Option(help="synthetic-av: clips per class and split")] = 4,
    seed: Annotated[int, typer.Option(help="synthetic-av: seed")] = 0,
    view: Annotated[
        list[str] | None,
        typer.Option(
            help="table: a view NAME=PATH (.csv, .tsv, .npy, .npz or .npz:KEY, .parquet), one "
            "row per sample; repeat for each view"
        ),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            help="table: one label per row (.csv, .txt, .npy); folder: a CSV/JSONL with path "
            "(or image and text), label and optional split and id columns"
        ),
    ] = None,
    ids: Annotated[
        Path | None, typer.Option(help="table: one sample id per row [default: row numbers]")
    ] = None,
    schema: Annotated[
        bool, typer.Option("--schema", help="print the data set manifest schema (JSON Schema)")
    ] = False,
) -> None:
    """Turn raw data into Parquet shards (shard format v1), resumably and in parallel.

    Example: mmval prep kinetics-sounds --raw /data/kinetics --out data/ks --workers 16
    On 8 machines: mmval prep kinetics-sounds --raw R --out D --shard-index $I --num-shards 8
    (I = 0..7), then: mmval prep kinetics-sounds --out D --merge
    Test data: mmval prep synthetic-av --raw-out raw/ks --layout kinetics-sounds --clips 8
    Your own features: mmval prep table --view a=a.csv --view b=b.npy --labels y.csv --out data/t
    (--splits PATH gives each row's split, else --set split.ratios=[0.7,0.1,0.2])
    Your own files: mmval prep folder --raw clips/ --labels clips/labels.csv --out data/mine
    Your own manifest: mmval prep my-data.yaml --raw DIR --out DIR (schema: mmval prep --schema)
    A data set's --set parameters: mmval prep synthetic --list
    """
    from mmval.data.manifest import load_dataset_manifest, manifest_names

    def print_counts(summary: PrepSummary) -> None:
        for name, c in summary.splits.items():
            reused = f", {c.reused_shards} shard(s) reused" if c.reused_shards else ""
            console.print(f"{name}: {c.written} written, {c.failed} failed of {c.planned}{reused}")
        if summary.planning_errors:
            console.print(f"{summary.planning_errors} listed clip(s) have no raw file")

    def check_failures(share: float) -> None:
        """Exit 1 when more than --max-failures of the inputs failed (the rest is written)."""
        if share > max_failures:
            err_console.print(
                f"[bold red]error:[/] {share:.1%} of the clips failed (more than --max-failures "
                f"{max_failures:.0%}); everything that could be extracted was written."
            )
            raise typer.Exit(1)

    if schema:
        from mmval.data.prep import manifest_schema

        sys.stdout.write(json.dumps(manifest_schema(), indent=2) + "\n")
        return
    if verbose and not list_:
        raise UserError("--verbose goes with --list: mmval prep DATASET --list --verbose.")
    if list_:
        names = [dataset] if dataset is not None else manifest_names()
        for name in names:
            entry, _ = load_dataset_manifest(name)
            console.print(Text.assemble((name, "bold"), f": {entry.description}"))
            if dataset is not None or verbose:
                _print_parameters(name)
        if dataset is None:
            console.print("[bold]synthetic-av[/]: fake raw clips in a real data set's layout")
            console.print("a data set's --set parameters: mmval prep DATASET --list")
        return
    # after --schema and --list: reading manifests imports no media decoders (PyAV, torch)
    from mmval.data.pipeline import PartSpec, PrepCallbacks, PrepSummary
    from mmval.data.prep import check_raw, merge_parts, prepare

    if dataset is None:
        raise UserError(
            "name the data set to prepare: mmval prep DATASET --out DIR, one of "
            f"{', '.join(manifest_names())}, synthetic-av, or a manifest file (`mmval prep "
            "--list` describes them)."
        )
    if dataset == "synthetic-av":
        _synthetic_av(raw_out, layout, clips, seed, set_ or [])
        return
    if not merge:  # a merge reads --raw only to check the parts against it
        check_raw(dataset, raw)
    inputs, splits = _prep_inputs(dataset, view, labels, ids, splits)
    target = out or Path("data") / Path(dataset).stem
    split_list = splits.split(",") if splits else None
    if merge:
        if shard_index is not None:
            raise UserError("--merge merges all parts: leave out --shard-index.")
        merged = merge_parts(
            dataset,
            target,
            count=num_shards,
            raw=raw,
            overrides=set_,
            limit=limit,
            splits=split_list,
            inputs=inputs,
        )
        assert merged.summary is not None
        count = merged.manifest.extraction["parts"]["count"]
        if merged.wrote:
            print_counts(merged.summary)
            console.print(
                f"merged {count} parts into {target} (the shards stay in the part folders); "
                f"failures are listed in {target / 'errors.parquet'}"
            )
        else:
            console.print(f"{target} already holds the merge of these {count} parts (verified)")
        check_failures(merged.summary.failure_share)
        return
    if (shard_index is None) != (num_shards is None):
        raise UserError("--shard-index and --num-shards go together (part I of N).")
    part = None if num_shards is None else PartSpec(shard_index or 0, num_shards)
    written = target if part is None else target / part.name
    with _progress() as progress:
        task = progress.add_task(f"prep {dataset}", total=None, status="")
        failed = [0]

        def on_plan(total: int) -> None:
            progress.update(task, total=total)

        def on_clip(ok: bool) -> None:
            failed[0] += not ok
            progress.update(task, advance=1)
            speed = progress.tasks[task].speed or 0.0
            status = f"{speed:.1f} clips/s" + (f", {failed[0]} failed" if failed[0] else "")
            progress.update(task, status=status)

        result = prepare(
            dataset,
            target,
            raw=raw,
            overrides=set_ or [],
            overwrite=overwrite,
            workers=workers,
            limit=limit,
            splits=split_list,
            clip_timeout=clip_timeout,
            callbacks=PrepCallbacks(on_plan=on_plan, on_clip=on_clip),
            part=part,
            inputs=inputs,
        )
    if not result.wrote:
        counts = ", ".join(f"{n} {s.samples}" for n, s in result.manifest.splits.items())
        console.print(f"{written} already prepared (checksums verified): {counts}")
        return
    assert result.summary is not None
    print_counts(result.summary)
    console.print(f"wrote {written}; failures are listed in {written / 'errors.parquet'}")
    if part is not None:
        console.print(
            f"part {part.index} of {part.count}: once every part is done, run "
            f"`mmval prep {dataset} --out {target} --merge`"
        )
    check_failures(result.summary.failure_share)


def _print_parameters(dataset: str) -> None:
    """The data set's `--set` parameters, with the values its manifest gives as defaults."""
    from mmval.data.prep import dataset_parameters

    table = Table(title=f"--set parameters of {dataset}")
    for column in ("parameter", "type", "default", "description"):
        table.add_column(column, overflow="fold")
    for f in dataset_parameters(dataset):
        table.add_row(*(Text(cell) for cell in (f.name, f.type, f.default, f.description)))
    console.print(table)


def _synthetic_av(
    raw_out: Path | None, layout: str, clips: int, seed: int, sets: list[str]
) -> None:
    from mmval.data.synthetic_av import layout_params, write_synthetic_raw

    if raw_out is None:
        raise UserError("synthetic-av writes raw clips: pass --raw-out DIR.")
    params = layout_params(layout, clips=clips, seed=seed, overrides=sets)
    with console.status(f"writing synthetic {layout} clips into {raw_out}"):
        written = write_synthetic_raw(raw_out, params)
    console.print(f"wrote {len(written)} clips in the {layout} layout to {raw_out}")


@app.command()
@user_errors
def train(
    recipe: Annotated[Path, typer.Option(help="recipe YAML file (a plain recipe or a sweep)")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="override a field: --set train.epochs=1 --set seeds=[0]"),
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue runs from their last.pt")] = False,
    overwrite: Annotated[bool, typer.Option(help="delete existing runs and start again")] = False,
    dry_run: Annotated[
        bool, typer.Option(help="check the recipe and list its runs; train nothing")
    ] = False,
    nproc: Annotated[
        int,
        typer.Option(
            min=1,
            help="train each run with N local processes (DDP: NCCL on GPUs, one per GPU; gloo "
            "on the CPU); train.batch_size stays the global batch",
        ),
    ] = 1,
) -> None:
    """Train a recipe, one run per seed, into OUTPUT/NAME/seed<k>/; a sweep (methods:, grid:)
    trains every combination into OUTPUT/NAME/<label>/seed<k>/. Finished runs are skipped.

    Example: mmval train --recipe recipes/ogm_ge-uci-mfeat.yaml --set method.alpha=0.5
    Sweep: mmval train --recipe recipes/sweep-seed-methods.yaml --set train.epochs=5
    Multi-GPU: mmval train --recipe recipes/ogm_ge-synthetic-av.yaml --nproc 4 (the same as
    torchrun --nproc-per-node 4 -m mmval train --recipe ...; docs/distributed.md)
    """
    from mmval.search import load_search
    from mmval.sweep import load_plan, run_plan, run_statuses

    search = load_search(recipe, set_ or [])
    if search is not None:
        if nproc > 1:
            raise UserError("a search trains its trials in one process: leave out --nproc.")
        _train_search(search, resume=resume, overwrite=overwrite, dry_run=dry_run)
        return
    plan = load_plan(recipe, set_ or [])
    if nproc > 1 and not dry_run:
        from mmval.distributed import launched, spawn_local

        if launched():
            raise UserError("--nproc starts processes itself; under torchrun leave it out.")
        args = ["train", "--recipe", str(recipe)]
        args += [part for value in set_ or [] for part in ("--set", value)]
        args += ["--resume"] * resume + ["--overwrite"] * overwrite
        raise typer.Exit(spawn_local(nproc, args))
    if not _main_process():  # another rank of a torchrun job: train, print nothing
        if not dry_run and any(
            o.status == "failed" for o in run_plan(plan, resume=resume, overwrite=overwrite)
        ):
            raise typer.Exit(1)
        return
    if dry_run:
        table = Table(title=f"{recipe}: {len(plan.runs())} run(s)")
        table.add_column("run folder", overflow="fold")
        table.add_column("status")
        table.add_column("combination", overflow="fold")
        for variant, _, run_dir, status in run_statuses(plan):
            table.add_row(str(run_dir), status, variant.where if plan.is_sweep else "")
        console.print(table)
        return

    def on_outcome(outcome: RunOutcome) -> None:
        if outcome.status == "failed":
            progress.console.print(f"[red]{outcome.run_dir}: failed[/]", soft_wrap=True)
            return
        s = outcome.summary
        note = "already finished, kept" if outcome.status == "skipped" else "done"
        name, val = _headline(s, "val")
        progress.console.print(
            f"{outcome.run_dir}: {note}; best epoch {s['best_epoch']}, "
            f"val {name} {val:.4f}, test {name} {s[f'test_{name}']:.4f}"
        )

    outcomes: list[RunOutcome] | None
    with _progress() as progress:
        callbacks = _train_callbacks(progress)
        try:
            outcomes = run_plan(
                plan,
                resume=resume,
                overwrite=overwrite,
                callbacks=callbacks,
                on_outcome=on_outcome,
            )
        except KeyboardInterrupt:
            outcomes = None
    if outcomes is None:  # Ctrl-C: where the run stopped (below its bar) and how to go on
        again = ["mmval", "train", "--recipe", str(recipe)]
        again += [part for value in set_ or [] for part in ("--set", value)] + ["--resume"]
        err_console.print(
            f"[bold red]interrupted:[/] {callbacks[0].where()}. Continue with: {shlex.join(again)}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130)
    if not plan.is_sweep:
        return
    table = Table(title=f"sweep {recipe}")
    name = next((_headline(o.summary, "val")[0] for o in outcomes if o.summary), "acc")
    for column in ("run", "seed", "status", "best epoch", f"val {name}", f"test {name}"):
        table.add_column(column, justify="right" if column != "run" else "left")
    style = {"trained": "green", "skipped": "dim", "failed": "bold red"}
    for o in outcomes:
        s = o.summary
        numbers = (
            [str(s["best_epoch"]), f"{s[f'val_{name}']:.4f}", f"{s[f'test_{name}']:.4f}"]
            if s and f"val_{name}" in s
            else [""] * 3
        )
        table.add_row(o.label, str(o.seed), f"[{style[o.status]}]{o.status}[/]", *numbers)
    console.print(table)
    counts = {k: sum(o.status == k for o in outcomes) for k in style}
    console.print(", ".join(f"{n} {k}" for k, n in counts.items()))
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        for o in failed:
            err_console.print(
                f"[bold red]failed:[/] {o.run_dir}: {o.error}", highlight=False, soft_wrap=True
            )
        raise typer.Exit(1)


def _train_search(search: Search, *, resume: bool, overwrite: bool, dry_run: bool) -> None:
    """`mmval train` of a recipe with `search:` (mmval.search): its space and trials with
    --dry-run, else the search, then its trials and best one."""
    from mmval.search import BEST_RECIPE, JOURNAL, run_search, trial_rows

    config = search.config
    if dry_run:
        table = Table(
            title=f"search {search.source}: {config.sampler} sampler (seed {config.seed}), "
            f"{config.trials} trial(s) of {len(search.base.seeds)} seed(s), metric "
            f"{config.metric or 'the selection metric'}; study in {search.folder / JOURNAL}"
        )
        table.add_column("recipe field")
        table.add_column("distribution", overflow="fold")
        for path, dist in config.space.items():
            shown = json.dumps(dist.model_dump(mode="json", by_alias=True, exclude_defaults=True))
            table.add_row(path, shown)
        console.print(table)
    else:

        def on_outcome(outcome: RunOutcome) -> None:
            note = {"trained": "done", "skipped": "already finished, kept"}.get(outcome.status)
            progress.console.print(f"{outcome.run_dir}: {note or 'failed'}", soft_wrap=True)

        with _progress() as progress:
            run_search(
                search,
                resume=resume,
                overwrite=overwrite,
                callbacks=_train_callbacks(progress),
                on_outcome=on_outcome,
            )
    rows = trial_rows(search)
    if not rows:
        return
    table = Table(title=f"trials in {search.folder}")
    for column in ("trial", "state", "value", *config.space):
        table.add_column(column, overflow="fold")
    for row in rows:
        value = "" if row.value is None else f"{row.value:.4f}"
        params = [json.dumps(row.params[p]) if p in row.params else "" for p in config.space]
        table.add_row(row.folder, row.state, value, *params)
    console.print(table)
    for row in rows:
        if row.error:
            err_console.print(f"[red]{row.folder} failed:[/] {row.error}", highlight=False)
    if not dry_run:
        if not any(row.state == "finished" for row in rows):
            raise typer.Exit(1)
        console.print(f"best trial's recipe: {search.folder / BEST_RECIPE}")


def _refuse_options(method: str, flags: tuple[tuple[str, bool], ...]) -> None:
    unused = [flag for flag, given in flags if given]
    if unused:
        raise UserError(f"{', '.join(unused)}: not options of --method {method}.")


@app.command()
@user_errors
@locks_out
@trusts_code
def value(
    checkpoint: Annotated[
        Path, typer.Argument(help="a best.pt or last.pt of a run, or a run folder (its best.pt)")
    ],
    out: Annotated[Path | None, typer.Option(help="output Parquet file")] = None,
    split: Annotated[str, typer.Option(help="split to value")] = "test",
    data: Annotated[Path | None, typer.Option(help="data directory if it has moved")] = None,
    device: Annotated[
        str, typer.Option(help="cpu, cuda, or auto (cuda when available, as train.device)")
    ] = "cpu",
    method: Annotated[
        str,
        typer.Option(
            help="shapley (exact, M <= 10), shapley-mc (sampled), cmob, dcor (distance "
            "correlation of the joint representation with each ground-truth group), subsets "
            "(every sample on every non-empty subset of modalities, M <= 10), or feature-mask "
            "(IMML's probe: random feature dimensions of one modality zeroed, per --ratios; "
            "protocol \\[ours])"
        ),
    ] = "shapley",
    permutations: Annotated[
        int | None, typer.Option(help="shapley-mc: orders sampled per sample [default: 100]")
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="seeds shapley-mc's orders and the --corrupt draws (one seed for both) "
            "[default: 0]"
        ),
    ] = None,
    benefit: Annotated[
        str | None,
        typer.Option(
            help="v(S), by task: classification and localisation correct (|S| if right, else "
            "0) or prob (true-class probability); regression abs_error (minus the absolute "
            "error) or acc2; segmentation dice [default: the task's first]"
        ),
    ] = None,
    mask: Annotated[
        str, typer.Option(help="feature (zero encoder output), input (zero input) or mean")
    ] = "feature",
    wide: Annotated[bool, typer.Option(help="write one row per sample")] = False,
    per_segment: Annotated[
        bool,
        typer.Option(
            help="localisation: value every segment of a clip (rows per sample and segment, "
            "the segment's class as label) instead of the clip (the mean over its segments)"
        ),
    ] = False,
    summary: Annotated[
        bool, typer.Option(help="print mean contribution, weakest share and gaps per modality")
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="samples per batch")] = 256,
    corrupt: Annotated[
        list[str] | None,
        typer.Option(
            help="corrupt a modality's input before the encoders, MODALITY=KIND:LEVEL with "
            "KIND gaussian or salt-pepper (QMF's definitions), blank (text: QMF's word "
            "blanking, LEVEL <= 10) or mask (a level % rectangle); repeat for several"
        ),
    ] = None,
    repeats: Annotated[
        int,
        typer.Option(min=1, help="independent draws of --corrupt (a first column `repeat`)"),
    ] = 1,
    ratios: Annotated[
        str | None,
        typer.Option(
            help="feature-mask: shares of each modality's feature dimensions zeroed, e.g. "
            "0,0.25,0.5 or 0,0.1,...,0.9 (the default); one random draw of dimensions per "
            "(--seed, repeat, modality, ratio) shared by all samples, --repeats draws \\[ours]"
        ),
    ] = None,
    trust_code: Annotated[
        bool,
        typer.Option(
            "--trust-code",
            help="load a checkpoint whose model has python encoders (model.encoder kind "
            "python): this imports and runs the code its recipe names",
        ),
    ] = False,
    lowest: Annotated[
        str | None,
        typer.Option(
            help="print the --k samples where this modality contributes least, with their "
            "source files; --out then writes those rows (CSV for a .csv file, else Parquet)"
        ),
    ] = None,
    k: Annotated[
        int | None, typer.Option("--k", min=1, help="how many samples --lowest lists [default: 20]")
    ] = None,
) -> None:
    """Per-sample, per-modality contributions of a checkpoint (Shapley values by default).

    Example: mmval value runs/concat-uci-mfeat/seed0/best.pt --out contrib.parquet --summary
    A run folder: mmval value runs/concat-uci-mfeat/seed0 --summary (its best.pt)
    Ground truth: mmval value runs/concat-mmlsyndata/seed0/best.pt --method dcor --out dcor.parquet
    Missing modalities: mmval value RUN/seed0/best.pt --method subsets --out subsets.parquet
    Masked features: mmval value RUN/seed0/best.pt --method feature-mask --out fm.parquet
    Under noise: mmval value RUN/seed0/best.pt --corrupt image=gaussian:5 --repeats 5 --out n.pq

    --corrupt applies to every method but dcor.
    --seed seeds shapley-mc's orders (the same in every repeat) and the corruption draws.
    The printed summary averages each sample's contribution over the repeats.
    Where a modality contributes least: mmval value RUN/seed0/best.pt --lowest audio --k 20
    """
    from mmval.artifacts.layout import checkpoint_of

    checkpoint = checkpoint_of(checkpoint)

    if lowest is None and k is not None:
        raise UserError("--k is the number of samples --lowest lists; pass --lowest MODALITY.")
    if lowest is not None and method in ("feature-mask", "subsets", "dcor"):
        raise UserError(f"--lowest lists contributions; --method {method} computes none.")
    if lowest is not None and wide:
        raise UserError("--wide shapes the contribution table; with --lowest, --out gets k rows.")
    if method == "feature-mask":
        _refuse_options(
            "feature-mask",
            (
                ("--permutations", permutations is not None),
                ("--benefit", benefit is not None),
                ("--mask", mask != "feature"),
                ("--wide", wide),
                ("--summary", summary),
                ("--corrupt", bool(corrupt)),
                ("--per-segment", per_segment),
            ),
        )
        _value_feature_mask(checkpoint, out, split, data, device, batch_size, ratios, repeats, seed)
        return
    if ratios is not None:
        raise UserError("--ratios is an option of --method feature-mask.")
    if method == "subsets":
        _refuse_options(
            "subsets",
            (
                ("--permutations", permutations is not None),
                ("--seed", seed is not None and not corrupt),
                ("--benefit", benefit is not None),
                ("--wide", wide),
                ("--per-segment", per_segment),
            ),
        )
        _value_subsets(
            checkpoint, out, split, data, device, batch_size, mask, corrupt, repeats, seed
        )
        return
    if repeats != 1 and not corrupt:
        raise UserError("--repeats draws the --corrupt corruptions anew; pass --corrupt.")
    if method == "dcor" and corrupt:
        raise UserError("--corrupt, --repeats: not options of --method dcor.")
    if method == "dcor":
        _refuse_options(
            "dcor",
            (
                ("--permutations", permutations is not None),
                ("--seed", seed is not None),
                ("--benefit", benefit is not None),
                ("--mask", mask != "feature"),
                ("--wide", wide),
                ("--summary", summary),
                ("--per-segment", per_segment),
            ),
        )
        _value_dcor(checkpoint, out, split, data, device, batch_size)
        return
    from mmval.data.corrupt import Corruption
    from mmval.valuation.config import valuation_config
    from mmval.valuation.run import (
        lowest_samples,
        value_checkpoint,
        write_lowest,
        write_valuation,
    )
    from mmval.valuation.summary import (
        contribution_gaps,
        contribution_summary,
        mean_over_repeats,
    )

    corruptions = [Corruption.parse(c) for c in corrupt or []]
    config = valuation_config(
        method=method,
        permutations=permutations,
        seed=None if corruptions and method != "shapley-mc" else seed,  # the corruptions' only
        benefit=benefit,
        mask=mask,
    )
    if out is None and not summary and lowest is None:
        raise UserError(
            "pass --out FILE to write the table, --summary or --lowest MODALITY to print, or both."
        )
    if wide and out is None:
        raise UserError("--wide shapes the table written to --out; pass --out FILE.")
    with console.status(f"valuing the {split} split ({config.method}, {config.mask} masking)"):
        result = value_checkpoint(
            checkpoint,
            split=split,
            data_dir=data,
            config=config,
            batch_size=batch_size,
            device=device,
            corruptions=corruptions,
            seed=seed or 0,
            repeats=repeats,
            per_segment=per_segment,
        )
        if out is not None and lowest is None:
            write_valuation(result, out, wide=wide)
    samples = result.table["sample_id"].nunique()
    shape = f"{samples} samples x {len(result.modalities)} modalities"
    if lowest is not None:
        rows = lowest_samples(result, lowest, 20 if k is None else k)
        if out is not None:
            write_lowest(rows, result, lowest, out)
            console.print(f"wrote {out}: the {len(rows)} samples where {lowest} contributes least")
        shown = [
            c
            for c in ("rank", "sample_id", "segment", "class", "contribution", "source")
            if c in rows
        ]
        _print_frame(
            rows[shown],
            f"the {len(rows)} samples where {lowest} contributes least (of {samples})",
            "{:.3f}",
            fold=True,
        )
        if not summary:
            return
    elif out is not None:
        console.print(f"wrote {out}: {shape}")
    contributions = mean_over_repeats(result.table)
    table = contribution_summary(contributions)
    if not summary:
        _print_frame(table[["modality", "mean", "std"]], "mean contribution per modality", "{:.3f}")
        return
    _print_frame(table, f"contribution per modality ({shape})", "{:.3f}")
    _print_frame(
        contribution_gaps(contributions), "mean contribution gap (row minus column)", "{:+.3f}"
    )


def _value_subsets(
    checkpoint: Path,
    out: Path | None,
    split: str,
    data: Path | None,
    device: str,
    batch: int,
    mask: str,
    corrupt: list[str] | None,
    repeats: int,
    seed: int | None,
) -> None:
    from mmval.data.corrupt import Corruption
    from mmval.valuation.config import valuation_config
    from mmval.valuation.subsets import subset_accuracy, subsets_checkpoint, write_subsets

    checked = valuation_config(mask=mask).mask  # the --mask message of the other methods
    corruptions = [Corruption.parse(c) for c in corrupt or []]
    with console.status(f"every subset of modalities on the {split} split ({mask} masking)"):
        result = subsets_checkpoint(
            checkpoint,
            split=split,
            data_dir=data,
            mask=checked,
            batch_size=batch,
            device=device,
            corruptions=corruptions,
            seed=seed or 0,
            repeats=repeats,
        )
        if out is not None:
            write_subsets(result, out)
    if out is not None:
        subsets = result.table["subset"].nunique()
        console.print(
            f"wrote {out}: {result.table['sample_id'].nunique()} samples x {subsets} subsets"
        )
    per_subset = subset_accuracy(result.table, result.metrics)
    _print_frame(per_subset, "mean per subset of modalities", "{:.4f}")


def _value_feature_mask(
    checkpoint: Path,
    out: Path | None,
    split: str,
    data: Path | None,
    device: str,
    batch: int,
    ratios: str | None,
    repeats: int,
    seed: int | None,
) -> None:
    from mmval.valuation.feature_mask import (
        DEFAULT_RATIOS,
        feature_mask_accuracy,
        feature_mask_checkpoint,
        parse_ratios,
        write_feature_mask,
    )

    parsed = parse_ratios(DEFAULT_RATIOS if ratios is None else ratios)
    with console.status(f"masking feature dimensions on the {split} split"):
        result = feature_mask_checkpoint(
            checkpoint,
            ratios=parsed,
            split=split,
            data_dir=data,
            seed=seed or 0,
            repeats=repeats,
            batch_size=batch,
            device=device,
        )
        if out is not None:
            write_feature_mask(result, out)
    if out is not None:
        samples = result.table["sample_id"].nunique()
        console.print(
            f"wrote {out}: {samples} samples x {len(result.modalities)} modalities x "
            f"{len(parsed)} ratios x {repeats} repeats"
        )
    _print_frame(
        feature_mask_accuracy(result.table),
        f"accuracy with a share of one modality's feature dimensions zeroed (mean of {repeats})",
        "{:.4f}",
    )


def _value_dcor(
    checkpoint: Path, out: Path | None, split: str, data: Path | None, device: str, batch: int
) -> None:
    from mmval.valuation.dcor import dcor_checkpoint, write_dcor

    with console.status(f"distance correlation on the {split} split"):
        result = dcor_checkpoint(
            checkpoint, split=split, data_dir=data, batch_size=batch, device=device
        )
        if out is not None:
            write_dcor(result, out)
    if out is not None:
        console.print(f"wrote {out}: {len(result.table)} ground-truth groups")
    _print_frame(result.table, "dCor(representation, group)", "{:.3f}")


@app.command()
@user_errors
@locks_out
def report(
    runs: Annotated[
        list[Path], typer.Argument(help="one or more folders of runs (searched recursively)")
    ],
    format_: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="table, md, csv, latex or html (default: from --out's suffix, else table)",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="write to this file instead of stdout")] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option(help="acc, f1 (macro) or any logged metric (acc_<modality>, ...); repeat"),
    ] = None,
    split: Annotated[str, typer.Option(help="test or val")] = "test",
    select: Annotated[
        str,
        typer.Option(
            help="val: each run at its best-validation epoch (honest); test-max: at its best "
            "test epoch, as the papers' official code (rows labelled; the only way to report "
            "runs of `train.protocol: published`)"
        ),
    ] = "val",
    baseline: Annotated[
        str | None, typer.Option(help="method (or row) to difference and test against")
    ] = None,
    alpha: Annotated[float, typer.Option(help="significance level of the markers")] = 0.05,
    resamples: Annotated[int, typer.Option(help="paired bootstrap resamples")] = 1000,
    holm: Annotated[
        bool,
        typer.Option(
            "--holm",
            help="Holm-correct the p-values behind the markers across the methods compared "
            "with the baseline (per data set, metric and test)",
        ),
    ] = False,
    figures: Annotated[
        Path | None,
        typer.Option(
            help="also write every figure into this folder as PNG, PDF and SVG, with the "
            "plotted numbers as CSV beside it"
        ),
    ] = None,
    methods: Annotated[
        str | None, typer.Option(help="only these methods, comma-separated (concat,ogm_ge)")
    ] = None,
    exclude: Annotated[
        str | None, typer.Option(help="leave out these methods, comma-separated")
    ] = None,
    where: Annotated[
        list[str] | None,
        typer.Option(
            help="only runs whose recipe has this value, dotted.path=value (method.alpha=0.5; "
            "the value read as YAML); repeat to require several"
        ),
    ] = None,
    reference: Annotated[
        list[str] | None,
        typer.Option(
            help="a published number as a row of its own, no rank or test: NAME=VALUE (the "
            "first metric of the one data set), NAME@DATASET=VALUE or NAME@DATASET:METRIC=VALUE; "
            "repeat"
        ),
    ] = None,
    references: Annotated[
        Path | None,
        typer.Option(help="a YAML file of published numbers: data set -> name -> value"),
    ] = None,
    robustness: Annotated[
        bool,
        typer.Option(
            "--robustness",
            help="instead of the main table: accuracy under noise (Avg./Worst. per level, as "
            "QMF) and with missing modalities (per subset, as C3R), from the runs' `mmval value "
            "--method subsets` / `feature-mask` tables and `evaluate:` outputs",
        ),
    ] = False,
) -> None:
    """Compare finished runs: metrics at the best-on-validation epoch, over seeds, one row per
    method and recipe, a column group per data set; significance against --baseline.

    Example: mmval report runs --baseline concat --out report.html
    The papers' protocol (best test epoch, labelled): mmval report runs --select test-max
    Noise and missing modalities: mmval report runs --robustness --baseline concat --out r.md
    Narrowed, with a published number: mmval report runs/a runs/b --methods concat,ogm_ge
    --where method.alpha=0.5 --reference 'OGM-GE (paper)=62.2'
    """
    from mmval.report import (
        FORMATS,
        SUFFIX_FORMATS,
        Narrowing,
        compare,
        find_runs,
        load_references,
        parse_reference,
        render,
        to_rich,
    )
    from mmval.report.tables import few_seeds

    fmt = format_ or (SUFFIX_FORMATS.get(out.suffix.lower(), "") if out else "") or "table"
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}.")
    if fmt == "table" and out is not None:
        raise UserError("--out needs a file format: --format md, csv, latex or html.")
    narrowing = Narrowing(_names(methods), _names(exclude), tuple(where or ()))
    refs = [parse_reference(r) for r in reference or []]
    refs += load_references(references) if references is not None else []
    if robustness:
        if metric:
            raise UserError("--metric does not apply to --robustness (its tables show accuracy).")
        if holm:
            raise UserError("--holm applies to the main table, not to --robustness.")
        if refs:
            raise UserError(
                "--reference and --references apply to the main table, not to --robustness."
            )
        tree = find_runs(runs, select, narrowing)
        _report_robustness(tree, fmt, out, split, baseline, alpha, resamples, figures)
        return
    comparison = compare(
        find_runs(runs, select, narrowing),
        metric,
        split=split,
        baseline=baseline,
        alpha=alpha,
        resamples=resamples,
        holm=holm,
        references=refs,
    )
    drawn: list = []
    if fmt == "html" or figures is not None:
        from mmval.report.figures import make_figures  # matplotlib: only to draw

        drawn = make_figures(comparison)
    if fmt == "table":
        console.print(to_rich(comparison))
    text = render(comparison, fmt, drawn) if fmt != "table" else None
    _write_out(text, out, figures, drawn)
    _print_left_out(comparison.left_out)
    if (warning := few_seeds(comparison)) is not None:
        err_console.print(warning, style="yellow", soft_wrap=True)


def _names(listed: str | None) -> tuple[str, ...]:
    """`concat,ogm_ge` -> its names."""
    return tuple(n.strip() for n in (listed or "").split(",") if n.strip())


def _write_out(text: str | None, out: Path | None, folder: Path | None, drawn: list) -> None:
    """The report text to stdout or --out (atomically), the figures to --figures."""
    from mmval.atomic import write_text_atomic

    if text is not None and out is None:
        sys.stdout.write(text)
    elif text is not None and out is not None:
        write_text_atomic(out, text)
        err_console.print(f"wrote {out}")
    if folder is not None:
        from mmval.report.figures import write_figures

        write_figures(drawn, folder)
        err_console.print(f"wrote {len(drawn)} figure(s) to {folder} (PNG, PDF, SVG, data as CSV)")


# how the CLI names each kind of left-out folder or table, by the start of its reason
_LEFT_OUT_KINDS = (
    ("unfinished", "unfinished"),
    ("duplicate", "duplicate"),
    ("published protocol", "published protocol"),
    ("evaluation table", "evaluation table"),
    ("damaged", "damaged"),
    ("not an mmval run", "foreign"),
)


def _print_left_out(left_out: list) -> None:
    """Every left-out run folder and table, grouped by kind (any other reason last)."""
    known = [prefix for prefix, _ in _LEFT_OUT_KINDS]
    kinds = [*_LEFT_OUT_KINDS, ("", "other")]
    for prefix, label in kinds:
        if prefix:
            left = [x for x in left_out if x.reason.startswith(prefix)]
        else:
            left = [x for x in left_out if not x.reason.startswith(tuple(known))]
        for noun in ("run(s)", "table(s)", "folder(s)"):
            group = [x for x in left if _left_out_noun(Path(x.run), label) == noun]
            if group:
                listing = "\n".join(f"  {x.run}: {x.reason}" for x in group)
                err_console.print(
                    f"left out {len(group)} {label} {noun}, not averaged:\n{listing}",
                    highlight=False,
                    soft_wrap=True,  # whole paths, to copy
                )


def _left_out_noun(path: Path, label: str) -> str:
    if label == "evaluation table" or path.suffix == ".parquet":
        return "table(s)"
    return "folder(s)" if label == "foreign" else "run(s)"


def _report_robustness(
    tree: RunTree,
    fmt: str,
    out: Path | None,
    split: str,
    baseline: str | None,
    alpha: float,
    resamples: int,
    figures: Path | None,
) -> None:
    from mmval.report import render_robustness, robustness, to_rich

    result = robustness(tree, split=split, baseline=baseline, alpha=alpha, resamples=resamples)
    drawn: list = []
    if fmt == "html" or figures is not None:
        from mmval.report.figures import robustness_figures

        drawn = robustness_figures(result)
    if fmt == "table":
        for comparison in result.comparisons:
            console.print(to_rich(comparison))
    text = render_robustness(result, fmt, drawn) if fmt != "table" else None
    _write_out(text, out, figures, drawn)
    _print_left_out(result.left_out)


@app.command()
@user_errors
def quickstart(
    workdir: Annotated[Path, typer.Option(help="where data/ and runs/ go")] = Path("."),
) -> None:
    """Prepare uci-mfeat, train concat, OGM-GE and unimodal baselines, value, report.

    Example: mmval quickstart
    """
    import time

    from mmval.quickstart import run_quickstart

    started = time.perf_counter()
    with _progress() as progress:
        result = run_quickstart(workdir, callbacks=_train_callbacks(progress))
    _print_frame(result.report, "uci-mfeat, test split, best-on-validation checkpoint")
    _print_frame(
        result.contributions, "Shapley contribution per modality (concat seed 0, test)", "{:.3f}"
    )
    console.print(f"per-sample table: {result.valuation_file}")
    console.print(f"quickstart finished in {time.perf_counter() - started:.0f} s")


@recipe_app.command("validate")
@user_errors
def recipe_validate(
    file: Annotated[Path, typer.Argument(help="recipe YAML file")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a field")] = None,
) -> None:
    """Check a recipe and print it with its bases merged in and every default filled in.

    Example: mmval recipe validate recipes/concat-uci-mfeat.yaml --set train.epochs=1
    """
    import yaml

    from mmval.recipe import load_recipe

    loaded = load_recipe(file, set_ or [])
    console.print(f"{file}: valid", style="green")
    print(yaml.safe_dump(loaded.model_dump(mode="json"), sort_keys=False))


@recipe_app.command("show")
@user_errors
def recipe_show(
    name: Annotated[
        str | None, typer.Argument(help="a method, fusion or plug-in [default: list them all]")
    ] = None,
) -> None:
    """List the methods, fusions and plug-ins, or show one: its settings (type, default,
    description), the official code it follows and the tasks it is defined for.

    Example: mmval recipe show ogm_ge (all of them: mmval recipe show)
    """
    from mmval.catalog import components, find_components

    if name is None:
        table = Table(title="methods (method.name), fusions (model.fusion), plug-ins (plugins:)")
        for column in ("kind", "name", "what it is"):
            table.add_column(column, overflow="fold")
        for c in components():
            table.add_row(c.kind, c.name, Text(c.summary))  # Text: `[ours]` is not markup
        console.print(table)
        console.print("details: mmval recipe show NAME")
        return
    for c in find_components(name):
        heading = Text.assemble((f"{c.kind} {c.name}", "bold"), f": {c.summary}")
        lines = [f"source: {c.source or 'not declared'}"]
        lines += [f"tasks: {', '.join(c.tasks)}"] if c.tasks else []
        console.print(heading, *lines, *c.notes, sep="\n", markup=False, highlight=False)
        if not c.fields:
            console.print("settings: none")
            continue
        table = Table(title=f"settings of {c.kind} {c.name}")
        for column in ("field", "type", "default", "description"):
            table.add_column(column, overflow="fold")
        for f in c.fields:
            table.add_row(*(Text(cell) for cell in (f.name, f.type, f.default, f.description)))
        console.print(table)


@recipe_app.command("schema")
def recipe_schema() -> None:
    """Print the recipe JSON Schema (for editor completion).

    Example: mmval recipe schema > recipe.schema.json
    """
    from mmval.recipe import recipe_json_schema

    print(json.dumps(recipe_json_schema(), indent=2))


if __name__ == "__main__":
    app()
