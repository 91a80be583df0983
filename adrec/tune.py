"""Hyperparameter search on Ray Tune: an experiment's declared space -> trials -> a tuned overlay.

    python jobs/tune.py experiment=movielens tune.num_samples=20

The space lives in ``conf/tune/space/<experiment>.yaml``: Hydra keys of the composed config,
each with a distribution (``trainer.lr: {loguniform: [1e-4, 1e-2]}``). The examples are
prepared once; every trial is then a Tune function trainable that runs the ordinary training
stage (``adrec.train.driver.train``: a Ray Train run) with its sampled values, and Ray Train's
per-epoch reports reach Tune through ``TuneReportCallback``, so ASHA stops weak trials early on
``trainer.select_metric`` / ``select_mode``. The best trial's values become
``conf/experiment/tuned/<experiment>.yaml``, a ``_global_`` overlay that the experiment's own
file includes after its values, so ``python jobs/pipeline.py experiment=<experiment>`` trains
with them.

Files (under ``<tune.dir>/<experiment>-<stamp>/``): ``trials.csv`` (one row per trial, best
first), ``search.json`` (``SearchReport``: the space, the settings, every trial and the best),
``tuned.yaml`` (a copy of the overlay: under ``ray job submit`` the job's copy of conf/ goes
away with it), ``trials/<trial id>/`` (each trial's training run) and Tune's own trial folders.
"""

from __future__ import annotations

import csv
import difflib
import functools
import inspect
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from unittest import mock

import ray
import ray.data
import ray.train
import ray.tune
from omegaconf import OmegaConf
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.util.placement_group import PlacementGroup, remove_placement_group

from adrec.data import prepare, synthetic
from adrec.models import model_builder
from adrec.pipeline import trainer_options
from adrec.results import TrainResult
from adrec.runtime import init_ray_from, require, resolve, write_json
from adrec.train import driver
from adrec.train.config import TrainerOptions

# A distribution's name in the space -> the Tune domain of its arguments (as Ray defines them:
# randint's upper bound is exclusive, like range()).
DISTRIBUTIONS = {
    "loguniform": ray.tune.loguniform,
    "uniform": ray.tune.uniform,
    "randint": ray.tune.randint,
    "choice": lambda *options: ray.tune.choice(list(options)),
}
# Only training reads these per trial; a data key would need one preparation per trial.
TUNABLE_SECTIONS = ("model", "trainer")
_ABSENT = object()


@dataclass(frozen=True)
class SearchOptions:
    """``tune.*`` of conf/tune/search.yaml (which documents each option) less the space."""

    num_samples: int
    max_concurrent: int
    trial_cpus: float
    grace_period: int
    reduction_factor: int
    time_budget_s: float | None
    seed: int
    dir: str
    overlay: str | None
    prepare: bool

    @classmethod
    def from_config(cls, tune: Mapping) -> SearchOptions:
        options = {k: v for k, v in tune.items() if k != "space"}
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"tune.{unknown[0]} is not a search option; known: {', '.join(known)}, space")
        return cls(**options)


@dataclass(frozen=True)
class Param:
    """One entry of the space: a config key and its distribution, as declared."""

    key: str  # a Hydra key of the composed config, e.g. trainer.lr
    kind: str  # a DISTRIBUTIONS name
    args: tuple  # its arguments: (low, high) or the choices

    def domain(self):
        return DISTRIBUTIONS[self.kind](*self.args)

    def probes(self) -> list:
        """Values to check the config with before any trial runs: every choice, or both ends."""
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        if self.kind == "choice":
            return list(self.args)
        return [float(a) for a in self.args]  # Tune samples floats, even between integer bounds

    def largest(self) -> float:
        return max(self.probes())


@dataclass
class SearchReport:
    """``search.json``: what was searched, how, every trial (best first) and the winner."""

    experiment: str
    metric: str
    mode: str
    space: dict  # key -> {distribution: args}, as declared
    options: dict  # SearchOptions
    trials: list[dict]  # trials_table rows
    best: dict  # the best trial's row
    overlay: str  # where the tuned overlay went
    search_dir: str
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def dotted_keys(node, prefix: str) -> list[str]:
    """``prefix`` and every dotted key under it in ``node`` (plain values), for 'did you mean' hints."""
    if not isinstance(node, Mapping):
        return [prefix]
    return [prefix] + [key for name, child in node.items() for key in dotted_keys(child, f"{prefix}.{name}")]


def check_key(cfg, key: str) -> None:
    """Raise ValueError unless ``key`` is a model or trainer key of the composed ``cfg``."""
    section = key.split(".", 1)[0]
    if section not in TUNABLE_SECTIONS:
        raise ValueError(
            f"tune.space: {key} is outside {' and '.join(TUNABLE_SECTIONS)}: the examples are prepared once per search, "
            "and only training reads its values per trial"
        )
    if OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False) is _ABSENT:
        known = dotted_keys(OmegaConf.to_container(cfg[section], resolve=False), section)
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"tune.space: {key} is not a key of the composed config{hint}")


def parse_space(space: Mapping, cfg) -> list[Param]:
    """The declared space, each key checked against ``cfg`` and each distribution against DISTRIBUTIONS."""
    if not space:
        raise ValueError("tune.space is empty")
    params = []
    for key, spec in space.items():
        check_key(cfg, str(key))
        if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ValueError(f"tune.space: {key} needs one distribution of {sorted(DISTRIBUTIONS)}, as {{loguniform: [1e-4, 1e-2]}}; got {spec!r}")
        kind, args = next(iter(spec.items()))
        args = tuple(args) if isinstance(args, (list, tuple)) else (args,)
        if kind != "choice" and (len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]):
            raise ValueError(f"tune.space: {key}: {kind} takes [low, high] with low < high; got {list(args)}")
        if kind == "choice" and not args:
            raise ValueError(f"tune.space: {key}: choice needs at least one option")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ValueError(f"tune.space: {key}: randint takes integers [low, high) (high excluded, as in ray.tune.randint)")
        params.append(Param(str(key), kind, args))
    return params


def base_config(cfg) -> dict:
    """``cfg`` as plain values for the trials, interpolations kept (a sampled value must reach the
    keys that refer to it) and the paths made absolute on the driver (trials chdir into their folders)."""
    base = OmegaConf.to_container(cfg, resolve=False)
    base.pop("hydra", None)
    base["paths"] = {k: resolve(v) for k, v in OmegaConf.to_container(cfg.paths, resolve=True).items()}
    return base


def trial_settings(base: dict, values: Mapping, train_dir: Path) -> tuple[dict, TrainerOptions]:
    """The resolved model config and the trainer options of a trial with ``values`` (key -> value)."""
    cfg = OmegaConf.create(base)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    trainer = trainer_options(cfg, str(train_dir))
    # A mid-epoch checkpoint reports a NaN score, which ASHA would rank: a trial reports at epoch ends only.
    return OmegaConf.to_container(cfg.model, resolve=True), replace(trainer, checkpoint_every_steps=0)


def check_trials(base: dict, params: list[Param], train_dir: Path) -> None:
    """Build every trial's settings at each probe value before Ray Tune starts, so a value of the
    wrong type or a model option the builder refuses fails once, here, naming the key."""
    for param in params:
        for value in param.probes():
            try:
                model, _ = trial_settings(base, {param.key: value}, train_dir)
                model_builder(model)
            except (TypeError, ValueError) as error:
                raise ValueError(f"tune.space: {param.key}: {param.kind} {list(param.args)} samples {value!r}, which fails: {error}") from error


def train_reporting_to_tune(prepared: Path, train_dir: Path, model: dict, trainer: TrainerOptions, seed: int):
    """``driver.train``, each of its Ray Train reports also reported to this Tune trial."""
    callback = TuneReportCallback()  # made here: it binds to the current Tune session
    if "callbacks" in inspect.signature(driver.train).parameters:
        return driver.train(prepared, train_dir, model, trainer, seed, callbacks=[callback])
    # Until driver.train takes callbacks, its RunConfig gets this one, in this trial's process only
    # (Tune runs each trial in its own actor; reuse_actors is off).
    with mock.patch.object(driver, "RunConfig", functools.partial(ray.train.RunConfig, callbacks=[callback])):
        return driver.train(prepared, train_dir, model, trainer, seed)


def run_trial(values: dict, *, base: dict, prepared: str, seed: int, trials_dir: str) -> None:
    """A Tune function trainable: the training stage with the trial's sampled ``values``."""
    train_dir = Path(trials_dir) / ray.tune.get_context().get_trial_id()
    # As adrec.runtime.init_ray does on the driver: the trial's process starts with Ray Data's
    # per-operator progress bars on, which would interleave with every other trial's output.
    ray.data.DataContext.get_current().enable_progress_bars = False
    model, trainer = trial_settings(base, values, train_dir)
    train_reporting_to_tune(Path(prepared), train_dir, model, trainer, seed)


def actor_placement_groups() -> list[tuple[PlacementGroup, bool]]:
    """This job's live placement groups that an actor created (Train controllers do, for their
    workers), each with whether that actor is dead. Detached groups and the driver's are left out.

    Read from the GCS table that ``ray.util.placement_group_table()`` reads, whose dicts leave out
    the creator; the public ``ray.util.state`` API would need the dashboard.
    """
    from ray._private.state import state  # Ray's own accessor of the GCS tables
    from ray.core.generated import gcs_pb2

    job = ray.get_runtime_context().get_job_id()
    no_actor = ray.ActorID.nil().binary()  # the creator of a group the driver made
    rows = [gcs_pb2.PlacementGroupTableData.FromString(raw) for raw in state._connect_and_get_accessor().get_placement_group_table()]
    return [
        (PlacementGroup(ray.PlacementGroupID(row.placement_group_id)), row.creator_actor_dead)
        for row in rows
        if row.state != gcs_pb2.PlacementGroupTableData.REMOVED
        and row.creator_job_id.hex() == job
        and not row.is_detached
        and row.creator_actor_id != no_actor
    ]


def release_orphaned_placement_groups() -> int:
    """Remove the placement groups whose creating actor is dead; return how many there were."""
    orphans = [group for group, creator_dead in actor_placement_groups() if creator_dead]
    for group in orphans:
        remove_placement_group(group)
    return len(orphans)


class ReleaseStoppedRuns(ray.tune.Callback):
    """Frees the workers' placement group of each trial that Tune stopped (ASHA, the time budget).

    Stopping a trial kills its actor and with it the Ray Train controller it drove, which never
    removes the group its workers held. Train's own cleaner notices a dead controller through the
    State API, which fails without the dashboard or beside another Ray instance on the machine;
    the group would then keep its CPUs until the search ended, and the next trial would wait for
    them for ever. So the search's own loop removes every placement group of this job whose
    creating actor (a Train controller) is dead.
    """

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self.next_check = 0.0

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if time.monotonic() >= self.next_check:
            self.next_check = time.monotonic() + self.every_s
            release_orphaned_placement_groups()


def release_after_search(timeout_s: float = 15.0) -> None:
    """After ``fit()``: the last stopped trial's controller dies a moment after Tune kills its actor,
    so wait until every Train group of the search is gone, releasing orphans (the Ray session may
    go on, as in the tests); give up after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while actor_placement_groups() and time.monotonic() < deadline:
        release_orphaned_placement_groups()
        time.sleep(0.5)


def trial_dirname(trial) -> str:
    """Tune's folder of a trial: its id (the default name repeats every sampled value)."""
    return f"trial_{trial.trial_id}"


def max_epochs(params: list[Param], cfg) -> int:
    """The most epochs any trial can train (ASHA's horizon)."""
    tuned = [p for p in params if p.key == "trainer.epochs"]
    return int(tuned[0].largest()) if tuned else int(cfg.trainer.epochs)


@dataclass(frozen=True)
class Plan:
    """A search checked before Ray starts: what to sample, what to rank by, where to write."""

    experiment: str
    space: dict  # as declared: key -> {distribution: args}
    params: tuple[Param, ...]
    options: SearchOptions
    metric: str  # trainer.select_metric, as the trials report it each epoch
    mode: str  # trainer.select_mode: max | min
    epochs: int  # the most any trial trains
    base: dict  # the composed config the trials start from (base_config)
    seed: int  # every trial trains with the experiment's seed: trials differ only in the sampled values
    search_dir: Path

    @classmethod
    def of(cls, cfg, experiment: str, conf_dir: Path) -> Plan:
        """The plan of ``cfg`` (composed from conf/tune/search.yaml); ValueError naming what is wrong."""
        options = SearchOptions.from_config(OmegaConf.to_container(cfg.tune, resolve=True))
        space = OmegaConf.to_container(cfg.tune.space, resolve=True) if cfg.tune.get("space") else {}
        if not space:
            raise ValueError(
                f"no search space declared for experiment={experiment}: write {conf_dir}/tune/space/{experiment}.yaml (see docs/tuning.md)"
            )
        params = parse_space(space, cfg)
        search_dir = Path(resolve(options.dir)) / f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
        base = base_config(cfg)
        check_trials(base, params, search_dir / "trials" / "check")
        return cls(
            experiment=experiment,
            space=space,
            params=tuple(params),
            options=options,
            metric=str(cfg.trainer.select_metric),
            mode=str(cfg.trainer.select_mode),
            epochs=max_epochs(params, cfg),
            base=base,
            seed=int(cfg.seed),
            search_dir=search_dir,
        )


def tuner(plan: Plan, prepared: Path) -> ray.tune.Tuner:
    """The Tuner of ``plan``: random samples of the space, ASHA on the metric per epoch."""
    options = plan.options
    trainable = ray.tune.with_parameters(
        run_trial, base=plan.base, prepared=str(prepared), seed=plan.seed, trials_dir=str(plan.search_dir / "trials")
    )
    # A trial only drives its Train run (whose workers hold trainer.cpus_per_worker each), so by default
    # it holds a token share of a CPU: on a 2-core machine a whole one would leave none for the data reads.
    trainable = ray.tune.with_resources(trainable, {"CPU": options.trial_cpus})
    # max_t past the last epoch: ASHA stops a trial that reaches max_t, which would kill it before its
    # training stage returns; a trial ends with its own epochs instead.
    scheduler = ASHAScheduler(
        time_attr="epoch",
        max_t=max(plan.epochs, options.grace_period) + 1,
        grace_period=options.grace_period,
        reduction_factor=options.reduction_factor,
    )
    return ray.tune.Tuner(
        trainable,
        param_space={p.key: p.domain() for p in plan.params},
        tune_config=ray.tune.TuneConfig(
            metric=plan.metric,
            mode=plan.mode,
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(random_state=options.seed, max_concurrent=options.max_concurrent),
            num_samples=options.num_samples,
            time_budget_s=options.time_budget_s,  # then every trial still running is stopped, and the search ends as usual
            reuse_actors=False,  # a fresh actor per trial: nothing of one trial's run leaks into the next
            trial_dirname_creator=trial_dirname,
        ),
        run_config=ray.tune.RunConfig(
            name=plan.search_dir.name, storage_path=str(plan.search_dir.parent), verbose=1, callbacks=[ReleaseStoppedRuns()]
        ),
    )


def trials_table(results, params: list[Param], metric: str, mode: str, trials_dir: Path, epochs: int) -> list[dict]:
    """One row per trial, best first: its values, its best ``metric`` and at which epoch, and how it ended
    (completed: all its epochs, or its training stage returned after early stopping; stopped: by ASHA
    or by tune.time_budget_s; error)."""
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        scored = frame[frame[metric].notna()] if frame is not None and metric in frame else None
        best = None
        if scored is not None and len(scored):
            best = scored.loc[scored[metric].idxmax() if mode == "max" else scored[metric].idxmin()]
        trial = (result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix("trial_")
        trained = int(frame["epoch"].max()) if frame is not None and "epoch" in frame else 0
        # Only a training stage that returned writes result.json (trainer early stopping ends it
        # before its epochs are done); a trial that ASHA or the time budget stopped was killed mid-run.
        finished = (trials_dir / trial / TrainResult.FILE).exists() or trained >= int(result.config.get("trainer.epochs", epochs))
        rows.append(
            {
                "trial": trial,
                **{p.key: result.config[p.key] for p in params},
                metric: None if best is None else float(best[metric]),
                "best_epoch": None if best is None else int(best["epoch"]),
                "epochs_trained": trained,
                "status": "error" if result.error else "completed" if finished else "stopped",
            }
        )
    worst = -math.inf if mode == "max" else math.inf
    rows.sort(key=lambda r: worst if r[metric] is None else r[metric], reverse=mode == "max")
    return rows


def write_trials_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict]) -> str:
    """``rows`` as a Markdown table (numbers to 4 significant digits), for the console and the docs."""

    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(row[k]) for k in header) + " |" for row in rows])


def nested(values: Mapping) -> dict:
    """``{"trainer.lr": 0.01}`` -> ``{"trainer": {"lr": 0.01}}``."""
    tree: dict = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def overlay_text(values: Mapping, header: list[str]) -> str:
    """A ``_global_`` experiment overlay setting ``values`` (dotted key -> value), with a comment ``header``."""
    comments = "".join(f"# {line}\n" for line in header)
    return "# @package _global_\n" + comments + OmegaConf.to_yaml(nested(values))


def includes_overlay(experiment_file: Path, experiment: str) -> bool:
    """Whether conf/experiment/<experiment>.yaml lists the tuned overlay in its defaults."""
    defaults = OmegaConf.load(experiment_file).get("defaults") or []
    return any(isinstance(d, Mapping) and d.get("optional tuned@_global_") == experiment for d in defaults)


def prepared_examples(cfg, options: SearchOptions) -> Path:
    """The prepared folder every trial reads: prepared now, as the main job does, unless
    ``tune.prepare=false`` (then it must exist)."""
    prepared = Path(resolve(cfg.paths.prepared_dir))
    if not options.prepare:
        require(prepared / "feature_map.json", "jobs/prepare.py (or drop tune.prepare=false)")
        return prepared
    if cfg.data.name == "synthetic" and not (Path(resolve(cfg.paths.raw_dir)) / "events").exists():
        synthetic.run(cfg)
    prepare.prepare(OmegaConf.to_container(cfg.data, resolve=True), prepared, int(cfg.seed))
    return prepared


def write_overlay(plan: Plan, best: dict, trials: int, command: str, conf_dir: Path) -> Path:
    """Write the best trial's values as the experiment's tuned overlay (and a copy in the search folder)."""
    header = [
        f"Tuned by: {command}",
        f"On {time.strftime('%Y-%m-%d %H:%M %Z')}: {trials} trials, ASHA on {plan.metric} ({plan.mode}); "
        f"best {plan.metric} = {best[plan.metric]:.4f} (trial {best['trial']})",
        f"Trials: {plan.search_dir / 'trials.csv'}; space: conf/tune/space/{plan.experiment}.yaml",
        f"conf/experiment/{plan.experiment}.yaml includes this file after its own values.",
    ]
    text = overlay_text({p.key: best[p.key] for p in plan.params}, header)
    (plan.search_dir / "tuned.yaml").write_text(text)
    overlay = Path(resolve(plan.options.overlay)) if plan.options.overlay else conf_dir / "experiment" / "tuned" / f"{plan.experiment}.yaml"
    overlay.parent.mkdir(parents=True, exist_ok=True)
    overlay.write_text(text)
    return overlay


def search(cfg, experiment: str, conf_dir: Path, command: str) -> SearchReport:
    """Search ``cfg.tune.space`` for ``experiment``; write the trials, the report and the overlay."""
    started = time.time()
    plan = Plan.of(cfg, experiment, conf_dir)  # before Ray starts: a bad space costs no start-up
    init_ray_from(cfg)
    prepared = prepared_examples(cfg, plan.options)
    results = tuner(plan, prepared).fit()
    release_after_search()
    rows = trials_table(results, list(plan.params), plan.metric, plan.mode, plan.search_dir / "trials", plan.epochs)
    write_trials_csv(plan.search_dir / "trials.csv", rows)
    best = rows[0]
    if best[plan.metric] is None:
        raise RuntimeError(f"no trial reported {plan.metric} (trainer.select_metric); see {plan.search_dir}")
    overlay = write_overlay(plan, best, len(rows), command, conf_dir)
    report = SearchReport(
        experiment=experiment,
        metric=plan.metric,
        mode=plan.mode,
        space=plan.space,
        options=asdict(plan.options),
        trials=rows,
        best=best,
        overlay=str(overlay),
        search_dir=str(plan.search_dir),
        seconds=round(time.time() - started, 1),
    )
    write_json(plan.search_dir / "search.json", report.to_json())
    return report


def run(cfg, experiment: str, conf_dir: str | Path, command: str = "jobs/tune.py") -> dict:
    """jobs/tune.py: search, print the trials and where the overlay went; return ``search.json``'s dict."""
    conf_dir = Path(conf_dir)
    report = search(cfg, experiment, conf_dir, command)
    print(f"\n== trials (best first; {report.metric}, {report.mode})\n" + markdown_table(report.trials), flush=True)
    best = {k: report.best[k] for k in report.space}
    print(f"\n== best {report.metric} = {report.best[report.metric]:.4f}: {best}", flush=True)
    print(f"== overlay {report.overlay} (copy in {report.search_dir}/tuned.yaml)", flush=True)
    experiment_file = conf_dir / "experiment" / f"{experiment}.yaml"
    if experiment_file.exists() and not includes_overlay(experiment_file, experiment):
        print(
            f"== note: {experiment_file} does not include it: add `- optional tuned@_global_: {experiment}` after `- _self_` to its defaults",
            flush=True,
        )
    return report.to_json()
