"""``look demo``: does LOOK's representation transfer better than the baselines'? On real data every
user has offline.

Scenario 1 (coarse → fine): Fashion-MNIST pre-trained with the 4 coarse labels only, evaluated on
the 10 fine labels with frozen features (linear probe, weighted kNN, few-shot).
Scenario 2 (cross-dataset): pre-trained on Fashion-MNIST's 10 labels, evaluated on scikit-learn's
8×8 digits resized to 28 px.
Same backbone, epochs, augmentations and optimiser for every method; CE trained on the fine labels is
the upper reference of scenario 1 and a randomly initialised backbone the floor of both.
Everything is resumable: re-running the same command skips finished stages.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from look.atomic import atomic_write_text
from look.config import RunConfig, load_config
from look.data import DataSpec

SCENARIO_COARSE = "fmnist-coarse_to_fine"
SCENARIO_DIGITS = "fmnist_to_digits"
METHODS_SCENARIO_1 = ("ce", "sl_mlp", "supcon", "nca", "look", "mocov2")
# MoCo v2 never reads labels, so its scenario-1 model serves scenario 2 as well.
METHODS_SCENARIO_2 = ("ce", "sl_mlp", "supcon", "nca", "look")
MOCO_LABEL = "mocov2 (no labels)"  # trained on the coarse split, but never reads a label


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of the demo. ``default`` fits ~15 minutes on 2 CPU cores, ``quick`` ~2 minutes."""

    train_subset: int
    epochs: int
    batch_size: int
    lr: float
    backbone: str = "look_cnn_small"
    head_hidden_dim: int = 512
    look_k: int = 200  # used when look_k_fraction is None
    # k as a fraction of the mean class size (docs/results.md: k ≈ the class size beats k = 200
    # here, where a coarse class holds ~2,500 of the 10,000 images).
    look_k_fraction: float | None = 1.0
    # τ = 0.05 beat 0.1 for LOOK and for NCA (3 seeds each, docs/results.md); NCA shares it.
    look_temperature: float = 0.05
    supcon_temperature: float = 0.1
    queue_size: int = 4096
    # MoCo v2's batch-norm groups on one device (shuffling BN, look.methods.mocov2): 4 groups of
    # a 256 batch are the 64-sample groups of MoCo's 4-GPU runs.
    moco_bn_splits: int = 4
    probe_train_subset: int = 10000
    probe_c_grid: tuple[float, ...] | None = None  # None: the linear probe's default C grid
    fewshot_episodes: int = 600
    seeds: tuple[int, ...] = (0,)
    num_workers: int = 2
    scenario_digits: bool = True
    map_points: int = 1500  # points per t-SNE panel
    # Fine-label kNN monitor during pre-training (train.knn_monitor): images per split.
    monitor_images: int = 2000
    analysis_per_coarse: int = 2000  # samples per coarse class for the multi-modality metrics
    # A smoke run (``quick``): its report says that its numbers check the pipeline only.
    smoke: bool = False

    @classmethod
    def default(cls) -> DemoPlan:
        # Measured on 2 CPU cores: ~1000 img/s for a CE step of look_cnn_small, ~700 for LOOK,
        # ~500 for the two-view methods; 11 pre-trainings of 3 × 10k images, 15 evaluations and
        # the analysis fit in about 12 minutes (12.2 measured with LOOK k = the class size).
        return cls(train_subset=10000, epochs=3, batch_size=256, lr=0.1)

    @classmethod
    def quick(cls) -> DemoPlan:
        return cls(
            train_subset=2000,
            epochs=1,
            batch_size=128,
            lr=0.1,
            queue_size=1024,
            probe_train_subset=2000,
            probe_c_grid=(0.1, 1.0, 10.0),
            fewshot_episodes=100,
            map_points=300,
            analysis_per_coarse=400,
            monitor_images=500,
            smoke=True,
        )


@dataclass
class DemoRun:
    scenario: str
    name: str  # e.g. "look (coarse)"
    method: str | None  # None: random initialisation
    labels: str
    seed: int
    run_dir: Path | None = None
    results: dict[str, Path] = field(default_factory=dict)


def _look_k_text(plan: DemoPlan) -> str:
    if plan.look_k_fraction is None:
        return f"k={plan.look_k}"
    return f"k={plan.look_k_fraction:.2f} × the mean class size"


def pretrain_config(
    plan: DemoPlan,
    method: str,
    labels: str,
    seed: int,
    device: str,
    extra_overrides: tuple[str, ...] = (),
) -> RunConfig:
    """The one recipe every demo method shares; only the method section differs.

    ``extra_overrides`` (``key=value``, applied last) let ablations change the rest of the recipe.
    """
    method_section: dict[str, Any] = {"name": method}
    if method not in ("ce",):
        method_section.update(head_hidden_dim=plan.head_hidden_dim, head_out_dim=128)
    if method == "look":
        if plan.look_k_fraction is not None:
            method_section.update(k_fraction=plan.look_k_fraction)
        else:
            method_section.update(k=plan.look_k)
        method_section.update(temperature=plan.look_temperature)
    if method == "nca":
        method_section.update(temperature=plan.look_temperature)
    if method == "supcon":
        method_section.update(temperature=plan.supcon_temperature)
    if method == "mocov2":
        method_section.update(queue_size=plan.queue_size, bn_splits=plan.moco_bn_splits)
    overrides = [
        "data.dataset=fashion_mnist",
        f"data.labels={labels}",
        f"data.subset={plan.train_subset}",
        f"data.num_workers={plan.num_workers}",
        f"model.backbone={plan.backbone}",
        f"optim.batch_size={plan.batch_size}",
        f"optim.epochs={plan.epochs}",
        f"optim.lr={plan.lr}",
        f"optim.warmup_epochs={min(1, plan.epochs)}",
        f"seed={seed}",
        f"train.device={device}",
        "train.progress=true",
        "train.log_every_steps=10",
        "train.checkpoint_every_steps=1000",
        "train.tensorboard=false",
        # The fine labels' kNN accuracy after every epoch, for the report's training curves.
        "train.knn_monitor=fashion_mnist",
        "train.knn_monitor_labels=fine",
        f"train.knn_monitor_images={plan.monitor_images}",
        *extra_overrides,
    ]
    cfg = load_config(None, overrides)
    cfg.method = method_section
    return cfg


def plan_runs(plan: DemoPlan) -> list[DemoRun]:
    runs: list[DemoRun] = []
    for seed in plan.seeds:
        for method in METHODS_SCENARIO_1:
            name = MOCO_LABEL if method == "mocov2" else f"{method} (coarse)"
            runs.append(DemoRun(SCENARIO_COARSE, name, method, "coarse", seed))
        runs.append(DemoRun(SCENARIO_COARSE, "ce (fine, upper ref.)", "ce", "fine", seed))
        runs.append(DemoRun(SCENARIO_COARSE, "random init (floor)", None, "none", seed))
        if plan.scenario_digits:
            for method in METHODS_SCENARIO_2:
                runs.append(DemoRun(SCENARIO_DIGITS, f"{method} (fine)", method, "fine", seed))
            runs.append(DemoRun(SCENARIO_DIGITS, MOCO_LABEL, "mocov2", "coarse", seed))
            runs.append(DemoRun(SCENARIO_DIGITS, "random init (floor)", None, "none", seed))
    return runs


def _run_key(run: DemoRun) -> str:
    return f"{run.method}_{run.labels}_s{run.seed}"


def _eval_dataset(plan: DemoPlan, scenario: str) -> DataSpec:
    if scenario == SCENARIO_COARSE:
        return DataSpec(dataset="fashion_mnist", subset=plan.probe_train_subset)
    return DataSpec(dataset="digits")


# Plan fields a finished stage does not depend on: seeds may be added to a finished demo, and
# the loader's workers change only its speed.
_PLAN_FIELDS_FREE_TO_CHANGE = {"seeds", "num_workers"}


def check_same_plan(output_dir: Path, plan: DemoPlan) -> None:
    """Refuse to reuse ``output_dir``'s finished stages under another plan: its models and
    results would be reported with settings they were never run with."""
    path = output_dir / "plan.json"
    if not path.is_file():
        return
    earlier = json.loads(path.read_text())
    now = json.loads(json.dumps(asdict(plan)))  # (tuples as JSON lists, like the file's)
    changed = [
        f"{name} {earlier.get(name)!r} then, {value!r} now"
        for name, value in now.items()
        # (a field the earlier file lacks came later: its run had the default)
        if name not in _PLAN_FIELDS_FREE_TO_CHANGE and name in earlier and earlier[name] != value
    ]
    if changed:
        raise ValueError(
            f"{output_dir} holds a demo run with another plan ({'; '.join(changed)}); its "
            "finished stages would be reported as this plan's. Pass another --output, or "
            "delete the folder to start over."
        )


# Said in the titles of a smoke run's report and analysis, as in its REPORT.md.
_SMOKE_TITLE = " (smoke run, look demo --quick: checks that every stage runs, not a result)"


def _schedule_text(plan: DemoPlan) -> str:
    """The learning-rate schedule pretrain_config gives, in words."""
    warmup = min(1, plan.epochs)
    if warmup == plan.epochs:  # (a one-epoch plan warms up all the way)
        return f"{plan.epochs} epoch, SGD lr {plan.lr} warmed up linearly over it"
    return (
        f"{plan.epochs} epochs, SGD lr {plan.lr} with {warmup} epoch of warm-up, then cosine decay"
    )


def check_plan_data(plan: DemoPlan) -> None:
    """Fail before any work, in the demo's own terms, when the plan asks for more (or fewer)
    Fashion-MNIST training images than there are (or the dataset is missing)."""
    from look.data import FASHION_MNIST_CLASSES, load_source

    available = len(load_source(DataSpec(dataset="fashion_mnist"), "train"))
    classes = len(FASHION_MNIST_CLASSES)  # the fine-label reference run needs every class
    for what, value, lowest, why in (
        ("--train-subset (images to pre-train on)", plan.train_subset,
         max(classes, plan.batch_size), f"the demo's batch of {plan.batch_size} images"),
        ("the linear probe's training subset", plan.probe_train_subset, classes,
         "the Fashion-MNIST classes"),
    ):  # fmt: skip
        if not lowest <= value <= available:
            raise ValueError(
                f"{what} is {value}: it must lie between {lowest} ({why}) "
                f"and {available} (its training images)"
            )


def run_demo(
    output_dir: str | Path,
    *,
    plan: DemoPlan | None = None,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> Path:
    """Pre-train, evaluate, analyse and write ``output_dir/REPORT.md``; returns its path."""
    from look.analysis import analyze_feature_sets, write_report
    from look.analysis.features import feature_sets_from_results
    from look.engine.trainer import pretrain
    from look.evaluation import FewShotOptions, LinearProbeOptions, ModelSource, evaluate

    plan = plan or DemoPlan.default()
    output_dir = Path(output_dir)
    check_same_plan(output_dir, plan)
    check_plan_data(plan)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "plan.json", json.dumps(asdict(plan), indent=2))
    runs = plan_runs(plan)
    # A re-run times only the stages it runs: the skipped ones keep their earlier times.
    timings_path = output_dir / "timings.json"
    timings: dict[str, float] = (
        json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    )
    timings.pop("total", None)
    started = time.perf_counter()

    # Stage 1: pre-training (each distinct (method, labels, seed) once).
    trained: dict[str, Path] = {}
    to_train = {_run_key(r): r for r in runs if r.method is not None}
    # Closed on the way out, errors included: a message then starts on a line of its own.
    # (disable=None: the bars are drawn on a terminal only, not into a redirected log)
    with tqdm(
        total=len(to_train) + 2, desc="demo", unit="stage", position=0, disable=None
    ) as stages:
        for key, run in to_train.items():
            stages.set_postfix_str(f"pre-train {key}")
            run_dir = output_dir / "pretrain" / key
            if not (run_dir / "summary.json").exists():
                t0 = time.perf_counter()
                pretrain(
                    pretrain_config(plan, run.method or "", run.labels, run.seed, device), run_dir
                )
                timings[f"pretrain/{key}"] = time.perf_counter() - t0
            trained[key] = run_dir
            stages.update(1)

        # Stage 2: transfer evaluation (frozen features; fine-tuning is left to `look evaluate`).
        stages.set_postfix_str("evaluate")
        # The smoke run's few episodes are deliberate: no warning about the protocol's 600.
        fewshot = FewShotOptions(episodes=plan.fewshot_episodes, warn_few_episodes=not plan.smoke)
        # (the smoke run's 3-value C grid is deliberately narrow, as its episodes are few: that
        # its best C lies on an edge is expected, not news)
        linear = (
            LinearProbeOptions(c_grid=plan.probe_c_grid, warn_grid_edge=not plan.smoke)
            if plan.probe_c_grid
            else None
        )
        result_files: dict[str, list[Path]] = {SCENARIO_COARSE: [], SCENARIO_DIGITS: []}
        notes: dict[str, None] = {}  # the evaluations' warnings, in order, without repeats
        for run in tqdm(runs, desc="evaluate", position=1, leave=False, disable=None):
            slug = run.name.split(" ")[0] + ("" if run.method is None else f"_{run.labels}")
            out = output_dir / "eval" / run.scenario / f"{slug}_s{run.seed}"
            if not _finished_evaluation(out / "results.json"):
                source = (
                    ModelSource(checkpoint=trained[_run_key(run)])
                    if run.method is not None
                    else ModelSource(timm=plan.backbone)
                )
                t0 = time.perf_counter()
                # Printed after the stage bars, not through them (and once each).
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    evaluate(
                        source,
                        _eval_dataset(plan, run.scenario),
                        ("linear", "knn", "fewshot"),
                        labels="fine",
                        output_dir=out,
                        image_size=28,
                        device=device,
                        cache_dir=output_dir / "cache",
                        seed=run.seed,
                        progress=False,
                        fewshot_options=fewshot,
                        linear_options=linear,
                    )
                for warning in caught:
                    notes.setdefault(f"{run.name}, seed {run.seed}: {warning.message}", None)
                timings[f"evaluate/{run.scenario}/{slug}_s{run.seed}"] = time.perf_counter() - t0
            _label_results(out / "results.json", run)
            result_files[run.scenario].append(out / "results.json")
        stages.update(1)

        # Stage 3: multi-modality inside the coarse classes, and the Figure-1 style maps.
        stages.set_postfix_str("analyze")
        analysis_dir = output_dir / "analysis"
        pairs = feature_sets_from_results(result_files[SCENARIO_COARSE])
        t0 = time.perf_counter()
        analysis = analyze_feature_sets(
            [feature_set for _, feature_set in pairs],
            analysis_dir,
            sources=[source for source, _ in pairs],
            seed=plan.seeds[0],
            max_points=plan.map_points,
            max_per_coarse=plan.analysis_per_coarse,
            title="Fashion-MNIST test set: frozen features, fine classes inside the coarse classes"
            + _SMOKE_TITLE * plan.smoke,
        )
        timings["analyze"] = time.perf_counter() - t0
        stages.update(1)

    for note in notes:
        log(f"look demo: note: {note}")
    report = write_report(
        [
            *result_files[SCENARIO_COARSE],
            *result_files[SCENARIO_DIGITS],
            analysis.multimodality_json,
        ],
        output_dir / "report",
        title="look demo" + _SMOKE_TITLE * plan.smoke,
        baseline=["ce (coarse)", "ce (fine)"],  # scenario 1's CE, and scenario 2's
    )
    timings["this_run"] = time.perf_counter() - started
    timings["total"] = sum(seconds for stage, seconds in timings.items() if stage != "this_run")
    atomic_write_text(timings_path, json.dumps(timings, indent=2))
    monitored: dict[str, list[Path]] = {}  # scenario 1's models, a run per seed
    for run in runs:
        if run.scenario == SCENARIO_COARSE and run.method is not None:
            monitored.setdefault(run.name, []).append(trained[_run_key(run)])
    curves = monitor_curves(monitored)
    path = _write_demo_report(
        output_dir, plan, runs, result_files, report, analysis, timings, curves
    )
    log(f"look demo: report written to {path}")
    return path


def _finished_evaluation(path: Path) -> bool:
    """Whether ``path`` holds a whole evaluation (``look evaluate`` marks partial files, which a
    re-run must redo, with ``"complete": false``)."""
    if not path.is_file():
        return False
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False  # cut short by hand or by a full disk: evaluate again
    return isinstance(content, dict) and content.get("complete", True) is not False


def _label_results(path: Path, run: DemoRun) -> None:
    """Name the model in results.json the way the demo's tables should show it."""
    content = json.loads(path.read_text())
    model = content.setdefault("model", {})
    if model.get("label") != run.name:
        model["label"] = run.name  # the report's row label
        atomic_write_text(path, json.dumps(content, indent=2))


def _headline(path: Path) -> dict[str, float]:
    """Linear-probe top-1, kNN-20 top-1 and 5-way 5-shot accuracy of one results.json."""
    content = json.loads(path.read_text())
    protocols = content.get("protocols", {})
    out: dict[str, float] = {}
    linear = protocols.get("linear", {})
    if "top1" in linear:
        out["linear"] = float(linear["top1"])
    for entry in protocols.get("knn", {}).get("results", []):
        if entry.get("k") == 20:
            out["knn20"] = float(entry["top1"])
    for entry in protocols.get("fewshot", {}).get("settings", []):
        if entry.get("k_shot") == 5:
            out["5shot"] = float(entry["mean_accuracy"])
    return out


def monitor_curves(run_dirs: dict[str, list[Path]]) -> dict[str, list[tuple[int, float]]]:
    """Each model's fine-label kNN accuracy during pre-training, from its runs'
    ``metrics_monitor`` rows: ``(epochs trained, top-1)`` averaged over the runs (seeds) that
    logged it. Runs without a monitor are left out."""
    from look.engine.metrics_log import read_metrics

    curves: dict[str, list[tuple[int, float]]] = {}
    for name, dirs in run_dirs.items():
        by_epoch: dict[int, list[float]] = {}
        for run_dir in dirs:
            for row in read_metrics(run_dir, "monitor"):
                by_epoch.setdefault(int(row["epochs_trained"]), []).append(float(row["knn_top1"]))
        if by_epoch:
            curves[name] = [(e, sum(v) / len(v)) for e, v in sorted(by_epoch.items())]
    return curves


def _plot_monitor_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for name, points in curves.items():
        epochs, accuracy = zip(*points, strict=True)
        axes.plot(
            epochs, accuracy, marker="o", label=name, linewidth=2.5 if "look" in name else 1.2
        )
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.set_xlabel("pre-training epochs")
    axes.set_ylabel("fine-label kNN top-1 (%)")
    axes.set_title("Fashion-MNIST fine labels during pre-training (kNN monitor)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _monitor_section(
    curves: dict[str, list[tuple[int, float]]], output_dir: Path, plan: DemoPlan
) -> list[str]:
    """The report's training-curve section: a table and a figure of the kNN monitor."""
    if not curves:
        return []
    epochs = sorted({e for points in curves.values() for e, _ in points})
    figure = output_dir / "monitor.png"
    _plot_monitor_curves(curves, figure)
    lines = [
        "## Fine-label kNN during pre-training",
        "",
        f"The kNN monitor (`train.knn_monitor`, k=20, {plan.monitor_images} training and "
        f"{plan.monitor_images} test images of Fashion-MNIST, fine labels) after each epoch; "
        "0 is the initialisation. Mean over seeds.",
        "",
        "| model | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
        "| --- | " + " | ".join("---" for _ in epochs) + " |",
    ]
    for name, points in curves.items():
        values = dict(points)
        cells = [f"{values[e]:.2f}" if e in values else "—" for e in epochs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, "", f"![kNN monitor]({figure.relative_to(output_dir)})", ""]


def _verdict(
    scores: dict[str, dict[int, dict[str, float]]], metric: str, look: str, rivals: list[str]
) -> str:
    """LOOK against each rival on ``metric``, from ``scores[label][seed][metric]``: a paired
    difference with its 95 % interval over the seeds both have (a win or a loss only when the
    interval excludes zero), or, with one seed, the two numbers and no claim beyond them."""
    from look.analysis.compare import BETTER, NO_INTERVAL, WORSE, PairedComparison

    mine = {seed: row[metric] for seed, row in scores.get(look, {}).items() if metric in row}
    if not mine:
        return f"- {metric}: no LOOK result."
    parts = []
    for rival in rivals:
        theirs = {s: row[metric] for s, row in scores.get(rival, {}).items() if metric in row}
        seeds = sorted(set(mine) & set(theirs))
        if not seeds:
            continue
        comparison = PairedComparison(
            "", metric, look, rival, tuple(seeds), tuple(mine[s] - theirs[s] for s in seeds)
        )
        mean_mine = sum(mine[s] for s in seeds) / len(seeds)
        mean_theirs = sum(theirs[s] for s in seeds) / len(seeds)
        numbers = f"{mean_mine:.2f} vs {mean_theirs:.2f}"
        if comparison.verdict == NO_INTERVAL:
            word = (
                "above"
                if mean_mine > mean_theirs
                else ("level with" if mean_mine == mean_theirs else "below")
            )
            parts.append(f"{word} {rival} ({numbers}; one seed, no interval)")
            continue
        word = {BETTER: "beats", WORSE: "loses to"}.get(comparison.verdict, "is level with")
        seeds_text = "" if comparison.same_on_every_seed else f" over {comparison.n} seeds"
        parts.append(
            f"{word} {rival} ({numbers}; difference {comparison.difference_text()}{seeds_text})"
        )
    return f"- {metric}: LOOK " + "; ".join(parts) + "."


def _write_demo_report(
    output_dir: Path,
    plan: DemoPlan,
    runs: list[DemoRun],
    result_files: dict[str, list[Path]],
    report: Any,
    analysis: Any,
    timings: dict[str, float],
    curves: dict[str, list[tuple[int, float]]] | None = None,
) -> Path:
    def seed_scores(scenario: str) -> dict[str, dict[int, dict[str, float]]]:
        from look.analysis.results import describe_model

        grouped: dict[str, dict[int, dict[str, float]]] = {}
        for path in result_files[scenario]:
            content = json.loads(path.read_text())
            seed = describe_model(content["model"], content=content)["seed"]
            per_seed = grouped.setdefault(content["model"]["label"], {})
            per_seed[len(per_seed) if seed is None else seed] = _headline(path)
        return grouped

    def mean_scores(
        per_seed: dict[str, dict[int, dict[str, float]]],
    ) -> dict[str, dict[str, float]]:
        means = {}
        for name, by_seed in per_seed.items():
            rows = list(by_seed.values())
            means[name] = {
                metric: sum(r[metric] for r in rows) / len(rows)
                for metric in rows[0]
                if all(metric in r for r in rows)
            }
        return means

    seeds1, seeds2 = seed_scores(SCENARIO_COARSE), seed_scores(SCENARIO_DIGITS)
    s1, s2 = mean_scores(seeds1), mean_scores(seeds2)
    rivals1 = ["ce (coarse)", "sl_mlp (coarse)", "supcon (coarse)", "nca (coarse)", MOCO_LABEL]
    rivals2 = ["ce (fine)", "sl_mlp (fine)", "supcon (fine)", "nca (fine)", MOCO_LABEL]
    relative = Path("report") / "REPORT.md"
    lines = [
        "# look demo: does LOOK transfer better?",
        "",
        f"Backbone `{plan.backbone}`, {plan.train_subset} Fashion-MNIST training images "
        f"(stratified subset), batch {plan.batch_size}, {_schedule_text(plan)}, "
        f"seeds {list(plan.seeds)}. LOOK {_look_k_text(plan)}, "
        f"τ={plan.look_temperature} (NCA too; SupCon τ={plan.supcon_temperature}). "
        "Frozen-feature protocols on the *fine* labels: linear probe "
        f"(L-BFGS logistic regression, C chosen on a validation split, {plan.probe_train_subset} "
        "training images), weighted kNN (τ=0.07), 5-way few-shot "
        f"({plan.fewshot_episodes} episodes, nearest centroid). Accuracies in %.",
        "",
    ]
    if plan.smoke:
        lines += [
            "> **Smoke run** (`look demo --quick`): a few minutes of training that checks that "
            "every stage runs. Its numbers say nothing about which method transfers better; "
            "run `look demo` (and `--seeds 0 1 2`) for that.",
            "",
        ]
    lines += [
        "## Verdict (computed from the numbers below, not written by hand)",
        "",
        "LOOK against each rival, seed by seed: *beats* or *loses to* only when the 95 % "
        "confidence interval of the paired difference excludes zero (`--seeds 0 1 2` gives one); "
        "with one seed the two numbers are given without a verdict.",
        "",
        "Scenario 1 — pre-trained on the 4 coarse labels, evaluated on the 10 fine labels:",
        _verdict(seeds1, "linear", "look (coarse)", rivals1),
        _verdict(seeds1, "knn20", "look (coarse)", rivals1),
        _verdict(seeds1, "5shot", "look (coarse)", rivals1),
    ]
    if s2:
        lines += [
            "",
            "Scenario 2 — pre-trained on Fashion-MNIST's 10 labels, evaluated on digits:",
            _verdict(seeds2, "linear", "look (fine)", rivals2),
            _verdict(seeds2, "knn20", "look (fine)", rivals2),
            _verdict(seeds2, "5shot", "look (fine)", rivals2),
        ]
    lines += ["", "## Headline numbers", ""]
    for title, scores in (
        ("Scenario 1: Fashion-MNIST coarse → fine", s1),
        ("Scenario 2: → digits", s2),
    ):
        if not scores:
            continue
        lines += [
            f"### {title}",
            "",
            "| model | linear probe | kNN k=20 | 5-way 5-shot |",
            "| --- | --- | --- | --- |",
        ]
        for name, row in scores.items():
            cells = [f"{row[m]:.2f}" if m in row else "—" for m in ("linear", "knn20", "5shot")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _monitor_section(curves or {}, output_dir, plan)
    lines += [
        "## Full tables, multi-modality and maps",
        "",
        f"- All protocols with mean ± std over seeds: [{relative}]({relative})",
        "- Multi-modality inside the coarse classes and the t-SNE maps: "
        "[analysis/ANALYSIS.md](analysis/ANALYSIS.md)",
        "",
    ]
    maps = sorted((output_dir / "analysis").glob("maps*.png"))
    for m in maps:
        lines += [f"![t-SNE maps]({m.relative_to(output_dir)})", ""]
    lines += [
        "## Time",
        "",
        f"Total {timings['total'] / 60:.1f} min of stages on this machine, "
        f"{timings['this_run'] / 60:.1f} min in the last run (per stage in `timings.json`; "
        "a re-run skips the finished pre-training runs and evaluations, and redoes the "
        "analysis and the reports).",
        "",
    ]
    path = output_dir / "REPORT.md"
    atomic_write_text(path, "\n".join(lines))
    return path
