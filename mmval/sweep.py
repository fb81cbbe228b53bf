"""Sweeps: one recipe file that lists several methods and/or a grid of settings.

A recipe becomes a sweep when it has `methods:` (instead of `method:`) or `grid:`:

```yaml
name: sweep-uci-mfeat
seeds: [0, 1, 2]
methods: [concat, ogm_ge, {name: pmr, alpha: 2.0}]   # a name (published defaults) or a mapping
grid:                                                  # optional: dotted path -> values
  method.alpha: [0.1, 0.5]     # only for the methods that have an `alpha` field
  optim.lr: [0.001, 0.0003]    # for every method
data: {dataset: uci-mfeat}
train: {epochs: 20}
```

Every combination (method entry x grid point) is its own recipe, validated in full (schema and
cross-checks, also against the data set's modalities) before anything trains, and runs once per
seed into `<output>/<name>/<label>/seed<k>/`, e.g. `runs/sweep-uci-mfeat/ogm_ge-alpha0.5-lr0.001/
seed0/`. The label is the method's name, then the settings that tell apart the entries of a method
listed twice, then the grid's (`alpha0.5`, `fusion_film`); a field is named by its last part
unless two swept paths share it.

Grid values replace the base recipe's (the `method:` of a one-method sweep included). A
`method.<field>` axis applies to the methods that have the field, except the `methods:` entries
that set it themselves (`{name: pmr, alpha: 2.0}` keeps its alpha). A sweep whose base leaves
`model.fusion` out gives each method the fusion it is defined with (qmf, cosine for mmcosine,
...; concat for most). A `methods:` entry may carry plug-ins, `{name: qmf, plugins: [c3r]}`
(labelled `qmf+c3r`); a plug-in's name alone (`c3r`) is concat with it.

A sweep file may name bases (`base: base/uci-mfeat.yaml`, mmval.compose) like any recipe;
they are merged in before the sweep is expanded.

Finished runs are skipped, so a stopped sweep is restarted by running it again (with `--resume`
for the run it stopped in). A run that fails with a user error does not stop the others: the
sweep lists it at the end and the CLI exits 1. Anything else (a bug, Ctrl-C) stops the sweep at
once.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from mmval import distributed
from mmval.artifacts.layout import LAST, SUMMARY
from mmval.compose import compose_recipe
from mmval.engine.loop import Callback
from mmval.engine.session import ensure_data, join_ranks
from mmval.errors import UserError
from mmval.locks import ensure_free
from mmval.methods import METHODS, MethodConfigUnion
from mmval.plugins import PLUGINS
from mmval.recipe import (
    NAME_PATTERN,
    SWEEP_KEYS,
    Recipe,
    _fill_placeholders,
    check_against_data,
    left_over_named,
    parse_recipe,
    variant_fields,
)
from mmval.runner import Trainer
from mmval.validation import format_problems, problems_of

UNSWEPT = ("name", "seeds", "output", *SWEEP_KEYS)  # with their subfields; and method, method.name


def _entry(value: Any) -> Any:
    """`ogm_ge` is short for `{name: ogm_ge}`; a plug-in's name (`c3r`, `{name: imml, ...}`)
    for concat with that plug-in, `{name: concat, plugins: [...]}`."""
    entry = {"name": value} if isinstance(value, str) else value
    if isinstance(entry, dict) and entry.get("name") in PLUGINS and entry["name"] not in METHODS:
        return {"name": "concat", "plugins": [entry]}
    return entry


def _method_part(value: Any) -> Any:
    """What `method:` gets of a `methods:` entry (its `plugins` go to the recipe's)."""
    entry = _entry(value)
    if isinstance(entry, dict):
        return {k: v for k, v in entry.items() if k != "plugins"}
    return entry


def _entry_label(entry: dict[str, Any]) -> str:
    """`qmf`, `qmf+c3r`: the method and its plug-ins, as run labels name them."""
    plugins = entry.get("plugins") or []
    names = [p if isinstance(p, str) else p.get("name", "?") for p in plugins]
    return "+".join([entry["name"], *names])


def _flatten(value: Any, prefix: str = "") -> Any:
    """`{optim: {lr: [...]}}` (what `--set grid.optim.lr=[...]` writes) -> `{optim.lr: [...]}`;
    a later key wins, so an override replaces the file's axis."""
    if not isinstance(value, dict):
        return value
    flat: dict[str, Any] = {}
    for key, child in value.items():
        path = f"{prefix}{key}"
        if isinstance(child, dict):
            flat.update(_flatten(child, f"{path}."))
        else:
            flat[path] = child
    return flat


class SweepAxes(BaseModel):
    """The sweep part of a recipe; the rest is validated per combination as a Recipe."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="runs go to output/name/<label>/seed<k>")
    methods: list[Annotated[MethodConfigUnion, BeforeValidator(_method_part)]] | None = Field(
        default=None,
        min_length=1,
        description="method names or method: mappings to compare; a mapping may list its "
        "`plugins` (`{name: qmf, plugins: [c3r]}`)",
    )
    grid: Annotated[
        dict[str, Annotated[list[Any], Field(min_length=1)]], BeforeValidator(_flatten)
    ] = Field(default_factory=dict, description="dotted recipe path -> values to try")


@dataclass(frozen=True)
class Variant:
    """One combination: a fully validated recipe, trained once per seed."""

    label: str
    where: str
    recipe: Recipe


@dataclass(frozen=True)
class SweepPlan:
    source: str
    is_sweep: bool
    variants: list[Variant]

    def runs(self) -> list[tuple[Variant, int]]:
        return [(v, seed) for v in self.variants for seed in v.recipe.seeds]


RunStatus = Literal["new", "started", "finished"]


@dataclass
class RunOutcome:
    label: str
    seed: int
    run_dir: Path
    status: Literal["trained", "skipped", "failed"]
    summary: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def load_plan(path: Path, overrides: Sequence[str] = ()) -> SweepPlan:
    """A recipe file (sweep or not), its bases and its `--set` overrides -> the runs it asks for."""
    kept: list[str] = []
    raw = compose_recipe(path, overrides, variant_fields, kept)
    with left_over_named(kept):
        return plan_from_raw(raw, str(path))


def plan_from_raw(raw: Any, where: str) -> SweepPlan:
    if isinstance(raw, dict) and "search" in raw:
        raise UserError(
            f"{where} is a search (search:): `mmval train --recipe` runs it (mmval.search)."
        )
    if not isinstance(raw, dict) or not any(key in raw for key in SWEEP_KEYS):
        recipe = parse_recipe(raw, where)
        return SweepPlan(where, False, [Variant(recipe.name, where, recipe)])
    return SweepPlan(where, True, _expand(raw, where))


def _expand(raw: dict[str, Any], where: str) -> list[Variant]:
    base = _fill_placeholders({k: v for k, v in raw.items() if k not in SWEEP_KEYS})
    given = {k: raw[k] for k in SWEEP_KEYS if k in raw}
    try:
        axes = SweepAxes.model_validate({"name": base.get("name"), **given})
    except ValidationError as exc:
        raw_axes = {"name": base.get("name"), **given}
        raise UserError(format_problems(problems_of(exc, raw_axes), f"sweep {where}")) from None
    entries = _entries(raw, base)
    problems = _axis_problems(axes, entries)
    if "methods" in raw and "method" in raw:
        problems.insert(0, ("methods", "give method: or methods:, not both"))
    if problems:
        raise UserError(format_problems(problems, f"sweep {where}"))
    distinct = _distinguishing(entries)
    short = _short_names([*axes.grid, *(k for keys in distinct.values() for k in keys)])
    output = base.get("output", str(Recipe.model_fields["output"].default))
    variants: list[Variant] = []
    invalid: dict[str, str] = {}
    for index, entry in entries:
        keys = [k for k in axes.grid if _sweeps(k, entry)]
        for values in itertools.product(*(axes.grid[k] for k in keys)):
            own = [(k, _setting(entry, k[7:])) for k in distinct[index]]
            swept = list(zip(keys, values, strict=True))
            parts = (_part(short[k], v) for k, v in [*own, *swept])
            label = "-".join([_entry_label(entry), *parts])
            combo = ", ".join(
                ([f"methods[{index}] {_entry_label(entry)}"] if index is not None else [])
                + [f"{k}={json.dumps(v, default=str)}" for k, v in swept]
            )
            variant_raw = copy.deepcopy(base)
            variant_raw["name"] = label
            if isinstance(output, str):
                variant_raw["output"] = str(Path(output) / axes.name)
            if index is not None:
                variant_raw["method"] = _method_part(copy.deepcopy(entry))
                if "plugins" in entry:
                    variant_raw["plugins"] = copy.deepcopy(entry["plugins"])
            for key, value in swept:
                _assign(variant_raw, key, value, where)
            try:
                recipe = parse_recipe(variant_raw, f"{where}, run {label} ({combo or 'base'})")
            except UserError as exc:
                invalid[label] = str(exc)
                continue
            variants.append(Variant(label, combo, recipe))
    if invalid:
        total = len(invalid) + len(variants)
        listed = ", ".join(invalid)
        more = f"\n({len(invalid)} of {total} combinations are invalid: {listed})"
        raise UserError(next(iter(invalid.values())) + (more if len(invalid) > 1 else ""))
    labels = [v.label for v in variants]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UserError(
            f"sweep {where}: combinations share a run folder ({', '.join(repeated)}); give the "
            "methods: entries different settings or drop the repeated grid values."
        )
    return variants


def _entries(raw: dict[str, Any], base: dict[str, Any]) -> list[tuple[int | None, dict]]:
    """(index in methods:, entry) per method; one entry (index None) for a `method:` sweep."""
    if "methods" in raw:
        return [(i, _entry(e)) for i, e in enumerate(raw["methods"])]
    method = base.get("method", {"name": "concat"})
    name = method.get("name", "concat") if isinstance(method, dict) else "concat"
    return [(None, {"name": name})]


def _fields(method: str) -> set[str]:
    return set(METHODS[method].Config.model_fields) if method in METHODS else set()


def _axis_problems(
    axes: SweepAxes, entries: list[tuple[int | None, dict]]
) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for key, values in axes.grid.items():
        where = f"grid.{key}"
        if key in ("method", "method.name") or key.split(".")[0] in UNSWEPT:
            problems.append((where, "cannot be swept (list seeds in seeds:, methods in methods:)"))
            continue
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            problems.append((where, "values repeat"))
        if not key.startswith("method."):
            continue
        name = key[7:].split(".")[0]
        if not any(name in _fields(e["name"]) for _, e in entries):
            listed = ", ".join(e["name"] for _, e in entries)
            problems.append((where, f"no method of this sweep has a field {name!r} ({listed})"))
        elif not any(_sweeps(key, e) for _, e in entries):
            problems.append((where, f"every method with a field {name!r} sets it in methods:"))
    return problems


def _sweeps(key: str, entry: dict[str, Any]) -> bool:
    """A `method.<field>` axis applies to the methods with that field, except the entries that
    set it themselves (`{name: pmr, alpha: 2.0}` keeps its alpha); other axes to every method."""
    if not key.startswith("method."):
        return True
    name = key[7:].split(".")[0]
    return name in _fields(entry["name"]) and name not in entry


def _distinguishing(entries: list[tuple[int | None, dict]]) -> dict[int | None, list[str]]:
    """The `method.<field>` paths that tell apart the entries of a method (with the same
    plug-ins) listed more than once (one listed once is labelled by its name alone)."""
    out: dict[int | None, list[str]] = {}
    for index, entry in entries:
        same = [e for _, e in entries if _entry_label(e) == _entry_label(entry)]
        keys = dict.fromkeys(k for e in same for k in e if k not in ("name", "plugins"))
        out[index] = [
            f"method.{k}"
            for k in keys
            if len({json.dumps(_setting(e, k), sort_keys=True, default=str) for e in same}) > 1
        ]
    return out


def _setting(entry: dict[str, Any], key: str) -> Any:
    """An entry's value for a method field, the published default where it gives none."""
    if key in entry:
        return entry[key]
    info = METHODS[entry["name"]].Config.model_fields.get(key)
    return None if info is None else info.get_default(call_default_factory=True)


def _short_names(paths: list[str]) -> dict[str, str]:
    """A label names a setting by its last part (`alpha`) unless two swept paths share it."""
    last = [p.rsplit(".", 1)[-1] for p in dict.fromkeys(paths)]
    return {p: p if last.count(p.rsplit(".", 1)[-1]) > 1 else p.rsplit(".", 1)[-1] for p in paths}


def _part(name: str, value: Any) -> str:
    """`alpha0.5`, `lr0.001`, `fusion_film`: readable, and allowed in a run name."""
    if isinstance(value, bool):
        text = f"_{str(value).lower()}"
    elif isinstance(value, int | float):
        text = str(value)
    else:
        shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        text = "_" + re.sub(r"[^A-Za-z0-9_.\-]+", "_", shown).strip("_.-")
    return f"{name}{text}"


def _assign(raw: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    """Set a grid value at its dotted path (a number indexes a list, as in `--set`)."""
    node: Any = raw
    keys = dotted.split(".")
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise UserError(f"sweep {where}: grid.{dotted}: {key} is not an item of the list.")
            if last:
                node[int(key)] = copy.deepcopy(value)
            else:
                node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = copy.deepcopy(value)
            else:
                node = node.setdefault(key, {})
        else:
            path = ".".join(keys[:depth])
            raise UserError(f"sweep {where}: grid.{dotted}: {path} is not a section.")


def run_statuses(plan: SweepPlan) -> list[tuple[Variant, int, Path, RunStatus]]:
    """What each run of the plan holds now: nothing, a started run, or its finished run."""
    out: list[tuple[Variant, int, Path, RunStatus]] = []
    for variant, seed in plan.runs():
        trainer = Trainer(variant.recipe, seed)
        status: RunStatus = "new"
        if trainer.finished_summary() is not None:
            status = "finished"
        elif (trainer.run_dir / LAST).is_file():
            status = "started"
        out.append((variant, seed, trainer.run_dir, status))
    return out


def check_plan(plan: SweepPlan, *, resume: bool, overwrite: bool) -> None:
    """Fail before anything trains: started runs without --resume/--overwrite, finished runs of
    another setting (a new name or --overwrite, never --resume), missing data, a
    method that does not fit the modalities its data set turns out to have; first, a run folder
    another command holds (named with its holder)."""
    statuses = run_statuses(plan)

    def free() -> None:
        for _, _, run_dir, _ in statuses:
            ensure_free(run_dir, folder=True, what=f"run folder {run_dir}")

    distributed.on_main(free)
    if not (resume or overwrite):
        started = [str(d) for _, _, d, status in statuses if status == "started"]
        unfinished = [d for d in started if not (Path(d) / SUMMARY).is_file()]
        if unfinished:
            listed = ", ".join(unfinished[:5]) + (
                f" and {len(unfinished) - 5} more" if unfinished[5:] else ""
            )
            raise UserError(
                f"{len(unfinished)} run folder(s) hold a run this recipe has not finished "
                f"({listed}); pass --resume to continue (train.epochs may grow), --overwrite to "
                "start again, or --set name=... for new runs."
            )
    refusals: list[str] = []
    for variant, seed in plan.runs():
        trainer = Trainer(variant.recipe, seed, resume=resume, overwrite=overwrite)
        if (refusal := trainer.start_refusal()) is not None:
            refusals.append(refusal)
    if refusals:
        more = f" (and {len(refusals) - 3} more run(s) like these)" if refusals[3:] else ""
        raise UserError(" ".join(refusals[:3]) + more)
    modalities: dict[str, list[str]] = {}
    for variant in plan.variants:
        data = variant.recipe.data
        key = data.model_dump_json()
        if key not in modalities:
            manifest = ensure_data(data)
            for name in data.modalities or []:
                manifest.modality(name)
            modalities[key] = [m.name for m in manifest.modalities]
        check_against_data(variant.recipe, modalities[key])


def run_plan(
    plan: SweepPlan,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
    on_outcome: Callable[[RunOutcome], None] = lambda outcome: None,
) -> list[RunOutcome]:
    """Train every run of the plan in order, skipping finished ones.

    In a sweep a run's user error is recorded and the next run goes on; in a plain recipe it
    stops there, as it always has.
    """
    join_ranks([v.recipe for v in plan.variants])  # under torchrun: each run distributed
    check_plan(plan, resume=resume, overwrite=overwrite)
    outcomes: list[RunOutcome] = []
    for variant, seed in plan.runs():
        # in a sweep progress names the combination, not only the method
        title = f"{variant.label} seed{seed}" if plan.is_sweep else None
        trainer = Trainer(
            variant.recipe,
            seed,
            resume=resume,
            overwrite=overwrite,
            callbacks=callbacks,
            title=title,
        )
        try:
            result = trainer.run()
        except UserError as exc:
            if not plan.is_sweep:
                raise
            outcome = RunOutcome(variant.label, seed, trainer.run_dir, "failed", error=str(exc))
        else:
            status = "skipped" if result.skipped else "trained"
            outcome = RunOutcome(variant.label, seed, result.run_dir, status, result.summary)
        outcomes.append(outcome)
        on_outcome(outcome)
    return outcomes
