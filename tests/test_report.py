"""`mmval report`: significance tests on hand-made numbers, then every format over a real run
tree (3 methods x 2 data sets x 3 seeds of tiny runs) checked against a pandas recomputation
from metrics.parquet, and the HTML report in headless Chromium (slow)."""

from __future__ import annotations

import base64
import itertools
import json
import math
import os
import re
import shutil
from html.parser import HTMLParser
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.data.prep import prepare
from mmval.metrics import macro_f1
from mmval.recipe import load_recipe, parse_recipe
from mmval.report import compare, find_runs, render
from mmval.report.figures import make_figures
from mmval.report.runs import NOT_SETTINGS
from mmval.report.significance import (
    PairedPredictions,
    paired_bootstrap,
    paired_t_test,
    student_t_two_sided,
    wilcoxon_signed_rank,
)
from mmval.report.tables import latex_escape
from mmval.runner import Trainer
from mmval.settings import Effect, marked
from mmval.valuation.run import value_checkpoint, write_valuation
from tests.conftest import Crash, crash_after

runner = CliRunner()
METHODS = ("concat", "late_fusion", "ogm_ge")
SEEDS = (0, 1, 2)


# ---- significance on hand-made numbers --------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "df", "p"),
    [
        (12.706, 1, 0.05),
        (4.303, 2, 0.05),
        (3.182, 3, 0.05),
        (2.776, 4, 0.05),
        (4.032, 5, 0.01),
        (2.228, 10, 0.05),
        (1.0, 1, 0.5),
    ],
)
def test_student_t_matches_tabulated_critical_values(t, df, p):
    assert student_t_two_sided(t, df) == pytest.approx(p, abs=2e-4)


def test_paired_t_test_by_the_closed_form_for_two_degrees_of_freedom():
    diffs = np.array([0.5, 2.0, 1.0])
    t = diffs.mean() / (diffs.std(ddof=1) / math.sqrt(3))
    assert paired_t_test(diffs) == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-12)
    assert paired_t_test(-diffs) == paired_t_test(diffs)
    assert paired_t_test(np.array([0.25, 0.25, 0.25])) == 0.0
    assert paired_t_test(np.zeros(3)) == 1.0
    assert math.isnan(paired_t_test(np.array([1.0])))


def test_wilcoxon_exact_by_enumerating_sign_patterns():
    assert wilcoxon_signed_rank(np.array([1.0, 2.0, 3.0])) == pytest.approx(2 / 8)
    # |d| ties: ranks 1.5, 1.5, 3; W+ = 4.5 of 6; |W+ - 3| >= 1.5 in 6 of the 8 patterns
    assert wilcoxon_signed_rank(np.array([1.0, -1.0, 2.0])) == pytest.approx(6 / 8)
    assert wilcoxon_signed_rank(np.array([0.0, 0.0])) == 1.0
    diffs = np.array([0.3, -1.1, 2.5, 4.0, -0.2, 5.5, 7.0])  # distinct magnitudes
    ranks = np.argsort(np.argsort(np.abs(diffs))) + 1
    observed = abs(ranks[diffs > 0].sum() - ranks.sum() / 2)
    extreme = sum(
        abs(sum(r for r, s in zip(ranks, signs, strict=True) if s) - ranks.sum() / 2) >= observed
        for signs in itertools.product([0, 1], repeat=len(ranks))
    )
    assert wilcoxon_signed_rank(diffs) == pytest.approx(extreme / 2 ** len(ranks))


def test_paired_bootstrap_sees_discordant_pairs():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    base = labels.copy()
    base[:40] = (labels[:40] + 1) % 4  # baseline wrong on 40 samples
    better = base.copy()
    better[:30] = labels[:30]  # fixes 30 of them
    observed, p = paired_bootstrap([PairedPredictions(labels, better, base)], "acc")
    assert observed == pytest.approx(100 * 30 / 400) and p < 0.01
    even = base.copy()
    even[:20] = labels[:20]  # fixes 20 ...
    even[100:120] = (labels[100:120] + 1) % 4  # ... and breaks 20 others
    observed, p = paired_bootstrap([PairedPredictions(labels, even, base)], "acc")
    assert observed == 0 and p > 0.5
    observed, p = paired_bootstrap([PairedPredictions(labels, base, base)], "f1")
    assert (observed, p) == (0.0, 1.0)
    observed, _ = paired_bootstrap(
        [PairedPredictions(labels, better, base), PairedPredictions(labels, even, base)], "f1"
    )
    expected = 100 * (macro_f1(better, labels) + macro_f1(even, labels)) / 2
    assert observed == pytest.approx(expected - 100 * macro_f1(base, labels))


def test_latex_escape_covers_the_special_characters():
    assert latex_escape(r"a_b%c&d#e$f{g}h~i^j\k") == (
        r"a\_b\%c\&d\#e\$f\{g\}h\textasciitilde{}i\textasciicircum{}j\textbackslash{}k"
    )
    assert latex_escape("1 ± 2 Δ†‡") == r"1 $\pm$ 2 $\Delta$$^{\dagger}$$^{\ddagger}$"


# ---- a real run tree ---------------------------------------------------------------------------


def _recipe(method: str, data: Path, output: Path, **extra: object) -> dict:
    raw: dict = {
        "name": f"{method}-{data.name}",
        "seeds": list(SEEDS),
        "data": {"path": str(data)},
        "model": {"encoder": {"hidden": [16], "out_dim": 8, "dropout": 0.1}},
        "method": {"name": method},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 3, "batch_size": 64},
        "output": str(output),
    }
    if data.name == "uci-mfeat":  # 3 of the 6 views, large batches: as fast as synthetic
        raw["data"]["modalities"] = ["fac", "pix", "zer"]
        raw["train"]["batch_size"] = 256
    if method == "late_fusion":
        raw["model"]["fusion"] = "late"
    if method == "concat":  # training-time valuation: contrib_epoch<k>.parquet
        raw["valuation"] = {"every": 1, "subset": 0.5, "split": "test"}
    return raw | extra


def build_tree(root: Path, synthetic: Path, uci: Path) -> Path:
    """3 methods x 2 data sets x 3 seeds, plus: a second ogm_ge recipe (one seed), a crashed
    run, `mmval value` tables (long in a run folder, wide outside)."""
    runs = root / "runs"
    for data in (synthetic, uci):
        for method in METHODS:
            recipe = parse_recipe(_recipe(method, data, runs), method)
            for seed in SEEDS:
                Trainer(recipe, seed).run()
        best = runs / f"concat-{data.name}" / "seed0" / "best.pt"
        write_valuation(value_checkpoint(best), best.parent / "contrib-test.parquet")
    alpha = _recipe("ogm_ge", synthetic, runs, name="ogm_ge-alpha", seeds=[0])
    alpha["method"] = {"name": "ogm_ge", "alpha": 0.9}
    Trainer(parse_recipe(alpha, "alpha"), 0).run()

    crashed = parse_recipe(_recipe("concat", synthetic, runs, name="crashed"), "crashed")
    with pytest.raises(Crash):
        Trainer(crashed, 0, callbacks=crash_after(1)).run()
    best = runs / f"ogm_ge-{uci.name}" / "seed1" / "best.pt"
    write_valuation(value_checkpoint(best, split="val"), runs / "ogm-val-wide.parquet", wide=True)
    return runs


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path, uci_dir: Path) -> Path:
    return build_tree(tmp_path_factory.mktemp("report"), synthetic_dir, uci_dir)


def expected_table(runs: Path, split: str = "test") -> pd.DataFrame:
    """The numbers recomputed from metrics.parquet alone: best epoch = first maximum of
    val_acc, mean and sample std over seeds in %, per (data set, recipe folder)."""
    lines = []
    for metrics in sorted(runs.glob("*/seed*/metrics.parquet")):
        folder = metrics.parent
        if not (folder / "summary.json").is_file():
            continue
        history = pd.read_parquet(metrics)
        best = history.loc[history["val_acc"].idxmax()]
        lines.append(
            {
                "folder": folder.parent.name,
                "seed": int(folder.name.removeprefix("seed")),
                "acc": 100 * best[f"{split}_acc"],
                "f1": 100 * best[f"{split}_f1"],
            }
        )
    frame = pd.DataFrame(lines)
    return frame


def _csv(runs: Path, *args: str) -> pd.DataFrame:
    result = runner.invoke(app, ["report", str(runs), "--format", "csv", *args])
    assert result.exit_code == 0, result.output
    return pd.read_csv(StringIO(result.stdout), keep_default_na=False, na_values=[""])


def _dataset_of(folder: str) -> str:
    return "uci-mfeat" if folder.endswith("uci-mfeat") else "synthetic"


def _row_of(folder: str) -> str:
    """The report row of a recipe folder: ogm_ge has two recipes (alpha 0.1 and 0.9) on
    synthetic, so its rows are named by alpha on both data sets."""
    if folder == "ogm_ge-alpha":
        return "ogm_ge (method.alpha=0.9)"
    method = folder.split("-")[0]
    return "ogm_ge (method.alpha=0.1)" if method == "ogm_ge" else method


def _rows(table: pd.DataFrame) -> pd.Series:
    variant = table["variant"].fillna("")
    return table["method"] + variant.map(lambda v: f" ({v})" if v else "")


def test_csv_matches_pandas_recomputation(tree):
    table = _csv(tree)
    assert list(table.columns[:7]) == [
        "dataset",
        "method",
        "n_seeds",
        "acc_mean",
        "acc_std",
        "f1_mean",
        "f1_std",
    ]
    expected = expected_table(tree)
    expected["dataset"] = expected["folder"].map(_dataset_of)
    expected["row"] = expected["folder"].map(_row_of)
    grouped = expected.groupby(["dataset", "row"]).agg(
        n=("acc", "size"),
        acc_mean=("acc", "mean"),
        acc_std=("acc", "std"),
        f1_mean=("f1", "mean"),
        f1_std=("f1", "std"),
    )
    got = table.assign(row=_rows(table)).set_index(["dataset", "row"])
    assert sorted(got.index) == sorted(grouped.index) and len(grouped) == 7
    for key, want in grouped.iterrows():
        assert got.loc[key, "n_seeds"] == want["n"] == (1 if "0.9" in key[1] else 3)
        for col in ("acc_mean", "acc_std", "f1_mean", "f1_std"):
            if want["n"] > 1 or col.endswith("mean"):
                assert got.loc[key, col] == pytest.approx(want[col], abs=1e-4), (key, col)
            else:
                assert np.isnan(got.loc[key, col])
    # every row carries its recipe hash (different for every row) and the version
    assert table["settings_hash"].str.fullmatch(r"[0-9a-f]{12}").all()
    assert table["settings_hash"].is_unique and (table["mmval_version"] == "0.1.0").all()


def test_val_split_and_logged_metrics(tree):
    table = _csv(tree, "--split", "val", "--metric", "acc_a")
    expected = expected_table(tree, "val")
    concat = expected[expected["folder"] == "concat-synthetic3"]
    row = table[(table["method"] == "concat") & (table["dataset"] == "synthetic")].iloc[0]
    assert row["acc_mean"] == pytest.approx(concat["acc"].mean(), abs=1e-4)
    # acc_a: modality a's unimodal accuracy, logged by concat (per-modality logits)
    history = [pd.read_parquet(tree / f"concat-synthetic3/seed{s}/metrics.parquet") for s in SEEDS]
    want = np.mean([100 * h.loc[h["val_acc"].idxmax(), "val_acc_a"] for h in history])
    assert row["acc_a_mean"] == pytest.approx(want, abs=1e-4)
    result = runner.invoke(app, ["report", str(tree), "--metric", "nope"])
    assert result.exit_code == 2 and "--metric nope" in result.output


def test_baseline_differences_and_paired_tests(tree):
    table = _csv(tree, "--baseline", "concat")
    expected = expected_table(tree)
    for dataset, suffix in (("synthetic", "synthetic3"), ("uci-mfeat", "uci-mfeat")):
        base = expected[expected["folder"] == f"concat-{suffix}"].set_index("seed")["acc"]
        mine = expected[expected["folder"] == f"ogm_ge-{suffix}"].set_index("seed")["acc"]
        diffs = (mine - base).to_numpy()
        on_dataset = table[table["dataset"] == dataset]
        line = on_dataset[_rows(on_dataset) == "ogm_ge (method.alpha=0.1)"].iloc[0]
        assert line["acc_delta"] == pytest.approx(diffs.mean(), abs=1e-4)
        if diffs.std(ddof=1) > 0:
            t = abs(diffs.mean()) / (diffs.std(ddof=1) / math.sqrt(3))
            assert line["acc_p_ttest"] == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-5)
        assert 0 < line["acc_p_bootstrap"] <= 1  # predictions were saved by every run
        assert 0 < line["f1_p_bootstrap"] <= 1
        marker = str(line["acc_marker"]) if pd.notna(line["acc_marker"]) else ""
        assert ("†" in marker) == (line["acc_p_ttest"] < 0.05)
        assert 0 < line["acc_p_hierarchical"] <= 1
        assert ("‡" in marker) == (line["acc_p_hierarchical"] < 0.05)
    # the one-seed variant is matched on seed 0 only: no t-test, but a bootstrap
    alpha = table[_rows(table) == "ogm_ge (method.alpha=0.9)"].iloc[0]
    assert alpha["matched_seeds"] == 1 and np.isnan(alpha["acc_p_ttest"])
    assert 0 < alpha["acc_p_bootstrap"] <= 1
    result = runner.invoke(app, ["report", str(tree), "--baseline", "ogm_ge"])
    assert result.exit_code == 2 and "name one of" in result.output


def test_holm_and_the_few_seeds_warning(tree):
    """--holm: the markers read p-values Holm-adjusted across the rows compared with concat on
    each data set (here by hand); a row matched on fewer than 3 seeds is warned about on the
    console and in the legend."""
    table = _csv(tree, "--baseline", "concat", "--holm")
    for dataset in ("synthetic", "uci-mfeat"):
        compared = table[(table["dataset"] == dataset) & (table["method"] != "concat")]
        for test in ("ttest", "hierarchical"):
            raw = compared[f"acc_p_{test}"].tolist()
            tested = sorted((p, i) for i, p in enumerate(raw) if not math.isnan(p))
            by_hand, running = [math.nan] * len(raw), 0.0
            for rank, (p, i) in enumerate(tested):
                running = max(running, min(1.0, (len(tested) - rank) * p))
                by_hand[i] = running
            assert compared[f"acc_p_{test}_holm"].tolist() == pytest.approx(
                by_hand, rel=1e-5, nan_ok=True
            )
        for line in compared.itertuples(index=False):
            marker = line.acc_marker if isinstance(line.acc_marker, str) else ""
            assert ("†" in marker) == (line.acc_p_ttest_holm < 0.05)
            assert ("‡" in marker) == (line.acc_p_hierarchical_holm < 0.05)
    result = runner.invoke(app, ["report", str(tree), "--baseline", "concat", "--format", "md"])
    assert result.exit_code == 0, result.output
    warning = (
        "fewer than 3 seeds matched with the baseline: ogm_ge (method.alpha=0.9) on synthetic (1)"
    )
    assert warning in " ".join(result.stderr.split())
    assert warning in result.stdout and "Holm" not in result.stdout
    result = runner.invoke(app, ["report", str(tree), "--baseline", "concat", "--holm"])
    assert "Holm-corrected" in " ".join(result.stdout.split())
    result = runner.invoke(
        app, ["report", str(tree), "--baseline", "late_fusion", "--format", "md"]
    )
    assert "fewer than 3 seeds matched" in result.stdout  # alpha=0.9 matched on seed 0 only
    result = runner.invoke(app, ["report", str(tree), "--format", "md"])
    assert "fewer than 3 seeds" not in result.stdout + result.stderr  # nothing compared


def test_saved_predictions_are_the_selected_checkpoints(tree):
    for folder in ("concat-synthetic3", "late_fusion-uci-mfeat"):
        run = tree / folder / "seed2"
        preds = pd.read_parquet(run / "predictions.parquet")
        history = pd.read_parquet(run / "metrics.parquet")
        best = history.loc[history["val_acc"].idxmax()]
        assert list(preds.columns) == ["sample_id", "label", "pred"]
        assert (preds["pred"] == preds["label"]).mean() == pytest.approx(best["test_acc"])
        assert preds["sample_id"].is_unique


def _lines_of(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| :--"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def test_markdown_layout_best_bold_second_underlined(tree):
    result = runner.invoke(app, ["report", str(tree), "--format", "md"])
    assert result.exit_code == 0, result.output
    rows = _lines_of(result.stdout)
    header = rows.pop("Method")
    assert header == [
        "synthetic Acc",
        "synthetic F1",
        "uci-mfeat Acc",
        "uci-mfeat F1",
        "Recipe",
        "mmval",
    ]
    assert list(rows) == [
        "concat",
        "late_fusion",
        "ogm_ge (method.alpha=0.1)",
        "ogm_ge (method.alpha=0.9)",
    ]
    expected = expected_table(tree)
    means = expected.groupby("folder")["acc"].mean()
    for column, dataset in ((0, "synthetic"), (2, "uci-mfeat")):
        folders = [f for f in means.index if _dataset_of(f) == dataset]
        ordered = sorted({round(means[f], 2) for f in folders}, reverse=True)
        for folder in folders:
            cell = rows[_row_of(folder)][column]
            value = round(means[folder], 2)
            assert cell.startswith(("**", "<u>", f"{value:.2f}")), cell
            assert cell.startswith("**") == (value == ordered[0])
            assert cell.startswith("<u>") == (len(ordered) > 1 and value == ordered[1])
            assert f"{value:.2f}" in cell
    assert "crashed/seed0: unfinished: 1 of 3 epochs" in result.stdout
    assert re.fullmatch(r"[0-9a-f]{12} / [0-9a-f]{12}", rows["concat"][4])
    assert rows["ogm_ge (method.alpha=0.9)"][2] == "-"  # no such run on uci-mfeat


def _latex_rows(source: str) -> tuple[int, list[str]]:
    """(columns of the tabular spec, the rows between \\begin and \\end)."""
    body = source.split("\\begin{tabular}{", 1)[1]
    spec, body = body.split("}", 1)
    body = body.split("\\end{tabular}")[0]
    rows = [r.strip() for r in re.split(r"\\\\", body) if r.strip()]
    return len(spec), rows


def _row_width(row: str) -> int:
    for rule in ("\\toprule", "\\midrule", "\\bottomrule"):
        row = row.replace(rule, "")
    row = re.sub(r"\\cmidrule\(lr\)\{\d+-\d+\}", "", row).strip()
    cells = re.split(r"(?<!\\)&", row)
    width = 0
    for cell in cells:
        span = re.match(r"\s*\\multicolumn\{(\d+)\}", cell)
        width += int(span.group(1)) if span else 1
    return width


def test_latex_is_a_well_formed_tabular(tree):
    result = runner.invoke(app, ["report", str(tree), "--format", "latex", "--baseline", "concat"])
    assert result.exit_code == 0, result.output
    source = result.stdout
    depth = 0
    for ch in re.sub(r"\\[{}]", "", source):  # escaped braces are text
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    columns, rows = _latex_rows(source)
    assert columns == 1 + 2 * 4 + 2  # method, 2 data sets x (Acc, ΔAcc, F1, ΔF1), recipe, mmval
    assert rows[-1] == "\\bottomrule" and len(rows) == 2 + 4 + 1  # 2 header lines, 4 rows
    for row in rows[:-1]:
        assert _row_width(row) == columns, row
    assert "late\\_fusion" in source and "ogm\\_ge (method.alpha=0.9)" in source
    preamble, tabular = source.split("\\begin{tabular}")
    assert all(line.startswith("% ") for line in preamble.splitlines())  # legend as comments
    text = re.sub(r"\\[a-zA-Z]+|\\[_%&#${}]", "", tabular.split("\\end{tabular}")[0])
    assert not re.search(r"[_%#]", text)  # every _ % # escaped
    assert "$-" in tabular and "$+" in tabular  # signed differences in math mode
    assert "\\textbf{" in source and "\\underline{" in source
    assert "% left out (not averaged): crashed/seed0" in source


class _Html(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        elif tag not in ("meta", "link", "br"):
            self.stack.append(tag)
        self.tables += tag == "table"

    def handle_endtag(self, tag: str) -> None:
        assert self.stack.pop() == tag


def test_html_report_and_figures(tree, tmp_path):
    out, figs = tmp_path / "report.html", tmp_path / "figs"
    result = runner.invoke(
        app,
        ["report", str(tree), "--out", str(out), "--baseline", "concat", "--figures", str(figs)],
    )
    assert result.exit_code == 0, result.output
    assert "left out 1 unfinished run(s)" in result.stderr
    page = _Html()
    page.feed(out.read_text(encoding="utf-8"))
    assert page.stack == [] and page.tables == 1
    names = sorted(p.stem for p in figs.glob("*.png"))
    assert names == sorted(
        f"{kind}-{dataset}"
        for dataset in ("synthetic", "uci-mfeat")
        for kind in ("accuracy", "unimodal", "contribution-epochs", "contribution", "weakest")
    )
    assert len(page.images) == len(names)
    for src in page.images:
        assert base64.b64decode(src.removeprefix("data:image/png;base64,"))[:8] == (
            b"\x89PNG\r\n\x1a\n"
        )
    assert "http" not in out.read_text(encoding="utf-8")  # nothing to fetch


def test_report_library_and_cli_edges(tree, tmp_path):
    comparison = compare(find_runs(tree), ["acc"], baseline="concat")
    assert comparison.rows[0] == "concat" and comparison.baselines == {
        "synthetic": "concat",
        "uci-mfeat": "concat",
    }
    assert [x.run.name for x in comparison.left_out] == ["seed0"]
    figures = make_figures(comparison)
    assert all(f.png.startswith(b"\x89PNG") for f in figures)
    assert "<table" in render(comparison, "html", figures)
    assert runner.invoke(app, ["report", str(tree)]).exit_code == 0  # rich table
    assert runner.invoke(app, ["report", str(tree), "--format", "pdf"]).exit_code == 2
    assert runner.invoke(app, ["report", str(tmp_path / "nowhere")]).exit_code == 2
    copy = tmp_path / "copy"
    shutil.copytree(tree / "concat-synthetic3", copy / "a")
    shutil.copytree(tree / "concat-synthetic3", copy / "b")
    result = runner.invoke(app, ["report", str(copy), "--format", "csv"])
    assert result.exit_code == 0 and ",3," in result.stdout.splitlines()[1]
    assert "left out 3 duplicate run(s)" in result.stderr


# ---- the HTML report in a real browser -----------------------------------------------------


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.slow
def test_html_report_in_headless_chromium(tree, tmp_path):
    found = _chromium()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are needed (apt-get install chromium)")
        pytest.skip("no chromium/chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    out = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(tree), "--out", str(out), "--baseline", "concat"])
    assert result.exit_code == 0, result.output
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    flags = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")
    for flag in (*flags, "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=found[1]), options=options)
    try:
        driver.get(out.resolve().as_uri())
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) == 10
        for image in images:
            loaded = driver.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth > 0", image
            )
            assert loaded and image.is_displayed(), image.get_attribute("alt")
        table = driver.find_element(By.CSS_SELECTOR, "table.results")
        assert table.is_displayed()
        rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
        assert [r.find_element(By.TAG_NAME, "th").text for r in rows] == [
            "concat",
            "late_fusion",
            "ogm_ge (method.alpha=0.1)",
            "ogm_ge (method.alpha=0.9)",
        ]
        assert "crashed" in driver.find_element(By.CSS_SELECTOR, "ul.left-out").text
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()


def test_fields_left_out_of_variant_labels_are_those_the_settings_hash_leaves_out(recipe_file):
    recipe = load_recipe(recipe_file(valuation={"every": 1}))
    assert set(NOT_SETTINGS) == set(marked(recipe, frozenset({Effect.NONE, Effect.RUN})))


def test_two_data_sets_of_one_name_are_two_column_groups(synthetic_dir, tmp_path):
    other = tmp_path / "other"
    small = [
        "modalities=[a,b,c]",
        "dims=[8,8,8]",
        "signal=[1.0,0.5,0.2]",
        "seed=5",
        "per_class={train: 30, val: 5, test: 10}",
    ]
    prepare("synthetic", other, overrides=small)
    runs = tmp_path / "runs"
    for data in (synthetic_dir, other):
        raw = _recipe("concat", data, runs) | {"seeds": [0], "valuation": None}
        Trainer(parse_recipe(raw, data.name), 0).run()
    table = _csv(runs)
    fingerprints = {
        json.loads((run / "summary.json").read_text())["data_fingerprint"][:12]
        for run in runs.glob("*/seed0")
    }
    assert len(fingerprints) == 2
    assert set(table["dataset"]) == {f"synthetic ({f})" for f in fingerprints}
    assert set(table["data_fingerprint"]) == fingerprints
