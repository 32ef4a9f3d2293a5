"""PNG plots of training curves from ``output_dir/metrics.jsonl``: ``alignkit plot`` and the end of every run.

Each PNG is one group of panels (``loss.png``, ``reward.png``, ``kl.png``, ``accuracy.png``, ``length.png``,
``policy.png``, ``lr.png``, ``speed.png``); each panel overlays the runs, one colour per run, eval dashed
with markers. The groups come from the methods in the runs' ``alignkit_config.yaml`` (every group when a
method is unknown). A panel is drawn only when one of its series has a finite value; a few are also skipped
when flat or a copy of another (a fixed KL coefficient, on-policy clip fractions of 0). Series of 100 points
or more are drawn raw and faint under a moving average.

matplotlib is optional and imported lazily. Figures are plain :class:`matplotlib.figure.Figure` objects on
an Agg canvas, never ``pyplot``: nothing is registered globally, the process-wide backend is left alone (a
notebook calling :func:`plot_run` keeps its inline plots), and each figure is cleared once saved.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignkit.config import file_in_the_way
from alignkit.errors import AlignkitError

logger = logging.getLogger("alignkit")

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "alignkit_config.yaml"  # alignkit.training.checkpoint.CONFIG_FILE (that module imports torch)
PLOTS_DIR = "plots"
INSTALL_HINT = "pip install 'alignkit[plots]'"

EVAL_PREFIX = "eval/"
FEW_POINTS = 40  # a series this short gets markers: a single eval point is invisible as a line
BEST_LEGEND_POINTS = 20_000
SMOOTH_FROM = 100  # a series this long is drawn raw (faint) under its moving average
LINESTYLES = ("-", "--", ":", "-.")
PANEL_W, PANEL_H, DPI = 5.6, 3.6, 100  # inches per panel: readable at 100 dpi, two panels a row


# --------------------------------------------------------------------------------------------------
# What is drawn
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Panel:
    """One axes: the metric keys drawn in it (one line style each), overlaid for every run."""

    title: str
    keys: tuple[str, ...] = ()
    eval: bool = True  # also draw ``eval/<key>`` (dashed, markers) where the run has it
    band: bool = False  # shade ``key ± key_std`` (MetricSums.add_values logs the std as ``<key>_std``)
    prefix: str = ""  # also draw every key under this prefix (reward sources are named by the user)
    exclude: tuple[str, ...] = ()  # keys under ``prefix`` that other panels draw
    skip_flat: bool = False  # skip when every point is the same value (a fixed KL coefficient, on-policy 0s)
    skip_same_as: str = ""  # skip when every series equals this key's (a single reward source is the reward)
    smooth: bool = True  # long series get a moving average (not the lr: a schedule is not noisy)

    def series_keys(self, available: Iterable[str]) -> list[str]:
        keys = list(self.keys)
        if self.prefix:
            keys += sorted(k for k in available if k.startswith(self.prefix) and k not in self.exclude
                           and not k.endswith("_std"))
        return keys


@dataclass(frozen=True)
class Group:
    """One PNG, ``<name>.png``: a grid of panels."""

    name: str
    panels: tuple[Panel, ...]


GROUPS: tuple[Group, ...] = (
    Group("loss", (
        Panel("loss", ("loss",)),
        Panel("policy loss", ("loss/policy",)),
        Panel("value loss", ("loss/value",)),
        Panel("KL term of the loss", ("loss/kl",), skip_flat=True),
        Panel("NLL", ("nll",)),
    )),
    Group("reward", (
        Panel("reward, mean ± std over samples", ("reward",), band=True),
        Panel("final reward, after EOS penalty / normalisation / clipping", ("reward/final",), band=True,
              skip_same_as="reward"),
        Panel("reward per source, raw", prefix="reward/", exclude=("reward/final",), skip_same_as="reward"),
    )),
    Group("kl", (
        Panel("KL(policy || reference) per sequence", ("kl",)),
        Panel("KL coefficient", ("kl_coef",), skip_flat=True),
        Panel("KL to the teacher", ("kl_to_teacher",)),
        Panel("training divergence", ("divergence",)),
    )),
    Group("accuracy", (
        Panel("reward accuracy: chosen > rejected", ("rewards/accuracies",)),
        Panel("reward margin: chosen - rejected", ("rewards/margins",)),
        # chosen and rejected already make two line styles per run: eval would make the legend unreadable
        Panel("rewards: chosen vs rejected", ("rewards/chosen", "rewards/rejected"), eval=False),
        Panel("log-probs: chosen vs rejected", ("logps/chosen", "logps/rejected"), eval=False),
        Panel("mean absolute error, regression", ("mae",)),
        Panel("mean reward", ("rewards/mean",)),
    )),
    Group("length", (
        Panel("response length in tokens", ("response_length",)),
        Panel("share of responses ending with EOS", ("ended_with_eos",)),
        Panel("completion length in tokens", ("completion_length",)),
        Panel("share of on-policy batches", ("on_policy",), skip_flat=True),
    )),
    Group("policy", (
        Panel("entropy per token", ("entropy",)),
        # with one update per rollout (on-policy) these are exactly 0: skipped, not drawn flat
        Panel("clip fraction", ("clipfrac",), skip_flat=True),
        Panel("approx. KL(old || new)", ("approx_kl",), skip_flat=True),
        Panel("critic: values vs returns", ("values", "returns"), eval=False),
        Panel("value clip fraction", ("value_clipfrac",), skip_flat=True),
    )),
    Group("lr", (
        Panel("learning rate", ("lr",), eval=False, smooth=False),
        Panel("gradient norm before clipping", ("grad_norm",), eval=False),
    )),
    Group("speed", (
        Panel("tokens/s", ("tok/s",), eval=False),
        Panel("share of the step spent generating", ("gen_share",), eval=False),
    )),
)

_RL = ("loss", "reward", "kl", "length", "policy", "lr", "speed")
_PREFERENCE = ("loss", "accuracy", "lr", "speed")
_DISTILL = ("loss", "kl", "length", "lr", "speed")
_SFT = ("loss", "lr", "speed")
#: method -> the groups that matter for it; the order of GROUPS is the order of the files
METHOD_GROUPS: dict[str, tuple[str, ...]] = {
    "sft": _SFT, "rejection_sampling": _SFT,
    "rm": _PREFERENCE, "dpo": _PREFERENCE, "simpo": _PREFERENCE, "cpo": _PREFERENCE, "orpo": _PREFERENCE,
    "kto": _PREFERENCE,
    "ppo": _RL, "rloo": _RL, "grpo": _RL, "reinforce_pp": _RL,
    "kd": _DISTILL, "seqkd": _DISTILL, "gkd": _DISTILL,
}


# --------------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------------


@dataclass
class RunMetrics:
    """One run: its legend name, its method (None when unknown) and key -> (steps, values) sorted by step."""

    name: str
    method: str | None
    series: dict[str, tuple[list[float], list[float]]]


def _number(value: Any) -> float | None:
    """A plottable float, or None for what is not a number (strings, lists, null)."""
    if not isinstance(value, (int, float)):
        return None
    value = float(value)
    # inf would stretch the autoscaled axis to nothing; a gap shows the bad step just as well
    return value if math.isfinite(value) else math.nan


def _parse_line(line: str) -> dict | None:
    """The record of one line, or None. A crash mid-write leaves a partial line and the resumed run appends
    to it without a newline, so on failure the last ``{"step"`` of the line is tried on its own."""
    try:
        record = json.loads(line)
    except ValueError:
        start = line.rfind('{"step"')
        if start <= 0:
            return None
        try:
            record = json.loads(line[start:])
        except ValueError:
            return None
    return record if isinstance(record, dict) else None


def read_metrics(path: Path) -> dict[str, tuple[list[float], list[float]]]:
    """key -> (steps, values) of a metrics.jsonl, sorted by step; {} when the file is missing or unreadable.

    A resumed run appends from its checkpoint's step on: when the step goes back, the older points from that
    step on are dropped (stale), and for a repeated step the later line wins. Lines without a numeric step
    and non-numeric values are skipped; NaN/Inf values become NaN (a gap in the line). Lines that are no JSON
    record at all (a damaged file) are skipped with a warning naming them; a last line without its newline is
    a write cut by a crash, skipped quietly.
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    points: dict[str, dict[float, float]] = {}
    last_step = -math.inf
    corrupt: list[int] = []
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        record = _parse_line(line) if line.strip() else None
        if record is None and line.strip() and (number < len(lines) or text.endswith("\n")):
            corrupt.append(number)
        step = _number(record.get("step")) if record else None
        if step is None or math.isnan(step):
            continue
        if step < last_step:  # eval lines share the train line's step, so only a restart goes back
            for by_step in points.values():
                for s in [s for s in by_step if s >= step]:
                    del by_step[s]
        last_step = step
        for key, raw in record.items():
            value = _number(raw) if key not in ("step", "time") else None
            if value is not None:
                points.setdefault(key, {})[step] = value
    if corrupt:
        shown = ", ".join(map(str, corrupt[:5])) + (", ..." if len(corrupt) > 5 else "")
        logger.warning("%s: skipped %d line(s) that are not JSON records (line %s); their metrics are not plotted.",
                       path, len(corrupt), shown)
    series = {}
    for key, by_step in points.items():
        steps = sorted(by_step)
        if steps:  # a key only the stale lines of a crashed run had is gone
            series[key] = (steps, [by_step[s] for s in steps])
    return series


def read_method(run_dir: Path) -> str | None:
    """The ``method:`` of the run's alignkit_config.yaml, or None when there is no readable one."""
    try:
        config = yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    method = config.get("method") if isinstance(config, dict) else None
    return method if isinstance(method, str) else None


def default_names(run_dirs: list[Path]) -> list[str]:
    """Folder names; where two runs share one (``a/run``, ``b/run``), ``parent/name`` tells them apart."""
    full = [Path(d).resolve() for d in run_dirs]
    names = [p.name or str(p) for p in full]
    return [f"{p.parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(full, names)]


def load_runs(run_dirs: list[Path], names: list[str] | None = None) -> list[RunMetrics]:
    names = names or default_names(run_dirs)
    return [RunMetrics(name, read_method(d), read_metrics(Path(d) / METRICS_FILE))
            for d, name in zip(run_dirs, names)]


# --------------------------------------------------------------------------------------------------
# Building figures
# --------------------------------------------------------------------------------------------------


def groups_for(methods: Iterable[str | None]) -> list[Group]:
    """The groups that matter for these methods; every group when one is unknown (no config, a new method),
    since a panel without data is skipped anyway."""
    wanted: set[str] = set()
    for method in methods:
        if method not in METHOD_GROUPS:
            return list(GROUPS)
        wanted.update(METHOD_GROUPS[method])
    return [g for g in GROUPS if g.name in wanted]


def _has_data(run: RunMetrics, key: str) -> bool:
    return key in run.series and any(not math.isnan(v) for v in run.series[key][1])


@dataclass(frozen=True)
class Line:
    """One series of a panel: its metric key, the train key (``eval/x`` -> ``x``), its legend suffix."""

    key: str
    base: str
    suffix: str
    is_eval: bool


def _panel_lines(panel: Panel, runs: list[RunMetrics]) -> list[Line]:
    """The series of the panel that some run has, in drawing order; [] when the panel is skipped."""
    available = {k for run in runs for k in run.series}
    lines = []
    for key in panel.series_keys(available):
        # one key: the legend says train/eval; several: the last part of the key (chosen, rejected, ...)
        short = key.rsplit("/", 1)[-1] if len(panel.keys) > 1 or panel.prefix else ""
        lines.append(Line(key, key, short or "train", False))
        if panel.eval:
            lines.append(Line(EVAL_PREFIX + key, key, f"{short} (eval)" if short else "eval", True))
    lines = [line for line in lines if any(_has_data(run, line.key) for run in runs)]
    return [] if _uninformative(panel, runs, lines) else lines


def _close(x: float, y: float) -> bool:
    # a reward source with weight 1 is the combined reward up to float32 rounding; NaN matches NaN
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) or (math.isnan(x) and math.isnan(y))


def _same_series(a: tuple[list[float], list[float]], b: tuple[list[float], list[float]]) -> bool:
    return a[0] == b[0] and all(_close(x, y) for x, y in zip(a[1], b[1]))


def _uninformative(panel: Panel, runs: list[RunMetrics], lines: list[Line]) -> bool:
    """A flat panel (``skip_flat``) or one that repeats another (``skip_same_as``): each costs as much to
    draw as a useful one and the end-of-run plots must stay fast."""
    if not lines:
        return True
    if panel.skip_flat:
        values = [v for run in runs for line in lines if line.key in run.series
                  for v in run.series[line.key][1] if not math.isnan(v)]
        if len(values) > 1 and min(values) == max(values):
            return True
    if panel.skip_same_as:
        pairs = [(run.series[line.key], run.series.get(panel.skip_same_as)) for run in runs for line in lines
                 if line.key in run.series]
        if all(other is not None and _same_series(mine, other) for mine, other in pairs):
            return True
    return False


def smooth(values: list[float]) -> list[float]:
    """Centred moving average over ~2% of the points (at least 3), NaN-aware: a NaN step neither poisons
    its neighbours nor breaks the curve. Raw curves of noisy metrics (reward, grad norm) hide each other.

    The window narrows symmetrically towards both ends, so the curve starts and ends on the data: a loss
    that falls steeply in its first steps is not averaged into a flat start."""
    import numpy as np

    y = np.asarray(values, dtype=float)
    n = len(y)
    index = np.arange(n)
    half = np.minimum(np.minimum(index, n - 1 - index), max(1, n // 100))
    finite = np.isfinite(y)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, y, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    lo, hi = index - half, index + half + 1
    count = counts[hi] - counts[lo]
    return np.where(count > 0, (sums[hi] - sums[lo]) / np.maximum(count, 1), np.nan).tolist()


def _draw_band(ax, run: RunMetrics, key: str, color: str, smoothed: bool) -> None:
    """Shade mean ± std where both were logged for the same step (both smoothed like the line)."""
    if f"{key}_std" not in run.series:
        return
    std = dict(zip(*run.series[f"{key}_std"]))
    steps = [s for s in run.series[key][0] if s in std]
    if not steps:
        return
    mean = [v for s, v in zip(*run.series[key]) if s in std]
    dev = [std[s] for s in steps]
    if smoothed:
        mean, dev = smooth(mean), smooth(dev)
    ax.fill_between(steps, [m - d for m, d in zip(mean, dev)], [m + d for m, d in zip(mean, dev)],
                    color=color, alpha=0.15, linewidth=0)


def _draw_line(ax, steps: list[float], values: list[float], *, smoothed: bool, **style: Any) -> None:
    """The curve; a long one is drawn raw and faint (label ``_raw``: left out of the legend) under its
    moving average."""
    if smoothed:
        ax.plot(steps, values, color=style["color"], linestyle=style["linestyle"], linewidth=0.6, alpha=0.25,
                label="_raw")
        values = smooth(values)
    ax.plot(steps, values, linewidth=1.4, markersize=3, **style)


def _linestyle(line: Line, bases: list[str]) -> str:
    """Keys differ by line style; eval is dashed where the panel has one key (loss vs eval/loss)."""
    if line.is_eval and len(bases) == 1:
        return "--"
    return LINESTYLES[bases.index(line.base) % len(LINESTYLES)]


def _draw_panel(ax, panel: Panel, runs: list[RunMetrics], lines: list[Line]) -> None:
    bases = list(dict.fromkeys(line.base for line in lines))
    # markers for short runs, decided per panel so the same key looks the same in every run
    longest = max(len(run.series[line.key][0]) for run in runs for line in lines if line.key in run.series)
    few = longest <= FEW_POINTS
    points, any_smoothed = 0, False
    for i, run in enumerate(runs):
        color = f"C{i % 10}"  # one colour per run, the same in every panel and file
        for line in lines:
            if not _has_data(run, line.key):
                continue
            steps, values = run.series[line.key]
            points += len(steps)
            smoothed = panel.smooth and len(steps) >= SMOOTH_FROM
            any_smoothed |= smoothed
            _draw_line(ax, steps, values, smoothed=smoothed, color=color, linestyle=_linestyle(line, bases),
                       label=run.name if len(lines) == 1 else f"{run.name}: {line.suffix}",
                       marker="o" if line.is_eval or few else None)
            if panel.band and not line.is_eval:
                _draw_band(ax, run, line.key, color, smoothed)
    # a fixed title position and fewer x ticks: placing titles and tick labels is most of matplotlib's time
    ax.set_title(panel.title + (" (smoothed)" if any_smoothed else ""), fontsize="medium", y=1.0, pad=5)
    ax.locator_params(axis="x", nbins=6)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    # loc="best" tests every vertex of every line: a fixed corner for long runs keeps plotting fast
    ax.legend(fontsize="small", loc="best" if points <= BEST_LEGEND_POINTS else "upper right", framealpha=0.7)


def build_figures(runs: list[RunMetrics]) -> dict[str, Any]:
    """Group name -> matplotlib Figure (not saved) for every group with at least one drawable panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figures = {}
    for group in groups_for(run.method for run in runs):
        panels = [(p, lines) for p in group.panels if (lines := _panel_lines(p, runs))]
        if not panels:
            continue
        ncols = 1 if len(panels) == 1 else 2
        nrows = math.ceil(len(panels) / ncols)
        width, height = (PANEL_W if ncols == 1 else 2 * PANEL_W), PANEL_H * nrows
        fig = Figure(figsize=(width, height), dpi=DPI)
        FigureCanvasAgg(fig)  # the Agg canvas, without switching the process-wide backend
        # fixed margins in inches: a layout engine (constrained/tight) measures every tick label and
        # doubled the time of the whole end-of-run plot
        fig.subplots_adjust(left=0.75 / width, right=1 - 0.2 / width, bottom=0.5 / height,
                            top=1 - 0.35 / height, wspace=0.25, hspace=0.75 / (PANEL_H - 0.75))
        for i, (panel, lines) in enumerate(panels):
            _draw_panel(fig.add_subplot(nrows, ncols, i + 1), panel, runs, lines)
        figures[group.name] = fig
    return figures


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise AlignkitError(f"plots need matplotlib, which is not installed: {INSTALL_HINT}.") from e


def _check_run_dir(run_dir: Path) -> None:
    """An AlignkitError naming the folder when it holds no metrics.jsonl."""
    if not run_dir.is_dir():
        raise AlignkitError(f"{run_dir}: no such folder; give the output_dir of a training run.")
    if not (run_dir / METRICS_FILE).is_file():
        raise AlignkitError(f"{run_dir}: no {METRICS_FILE} here; is it the output_dir of a training run "
                            "(with jsonl in training.report_to)?")


def save_figures(figures: dict[str, Any], out_dir: Path) -> list[Path]:
    """``<out_dir>/<group>.png`` for each figure (out_dir is created only when there is one)."""
    paths = []
    for name, fig in figures.items():
        path = Path(out_dir) / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        # zlib level 1: plot PNGs (flat colours) grow a little and encode several times faster
        fig.savefig(path, pil_kwargs={"compress_level": 1})
        fig.clear()  # no pyplot, so nothing to close; this frees the artists without waiting for the GC
        paths.append(path)
    return paths


def plot_runs(run_dirs: list[Path], out_dir: Path, *, names: list[str] | None = None) -> list[Path]:
    """Write the PNGs of the curves that matter for the runs' methods, the runs overlaid, into ``out_dir``.

    Legend names default to the folder names. Raises AlignkitError for a folder without metrics.jsonl, a
    ``names`` list of the wrong length, or a missing matplotlib. Returns the files written.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise AlignkitError("no run folder to plot.")
    if names is not None and len(names) != len(run_dirs):
        raise AlignkitError(f"{len(names)} name(s) for {len(run_dirs)} run folder(s): give one name per run.")
    for run_dir in run_dirs:
        _check_run_dir(run_dir)
    blocking = file_in_the_way(out_dir)
    if blocking is not None:
        where = "" if blocking == Path(out_dir).expanduser() else f" ({blocking} is a file)"
        raise AlignkitError(f"{out_dir}: not a folder{where}; write the plots to another folder (--out DIR).")
    _require_matplotlib()
    return save_figures(build_figures(load_runs(run_dirs, names)), out_dir)


def plot_run(run_dir: Path) -> list[Path]:
    """The plots of one run into ``run_dir/plots``, at the end of every run; never raises.

    Without matplotlib it logs one line; without metrics it does nothing.
    """
    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        return []
    try:
        _require_matplotlib()
    except AlignkitError as e:
        logger.info(f"no plots: {e}")
        return []
    try:
        return plot_runs([run_dir], run_dir / PLOTS_DIR)
    except Exception as e:  # a plot is a by-product: a bug here must not fail a finished training run
        logger.warning(f"plots of {run_dir} skipped: {type(e).__name__}: {e}")
        return []


def plot_main(argv: list[str]) -> int:
    """``alignkit plot RUN_DIR [RUN_DIR ...] [--out DIR] [--names a,b]``: prints the files written."""
    parser = argparse.ArgumentParser(
        prog="alignkit plot", description="PNG plots of the training curves of one or more runs, overlaid.")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a training output_dir")
    parser.add_argument("--out", type=Path, metavar="DIR", help="where the PNGs go (default: RUN_DIR/plots "
                                                                "for one run, ./plots for several)")
    parser.add_argument("--names", metavar="A,B", help="legend names, one per RUN_DIR (default: the folder "
                                                       "names)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    out = args.out or (args.run_dirs[0] / PLOTS_DIR if len(args.run_dirs) == 1 else Path(PLOTS_DIR))
    paths = plot_runs(args.run_dirs, out, names=names)
    if not paths:
        folders = ", ".join(str(d) for d in args.run_dirs)
        raise AlignkitError(f"nothing to plot: no numeric metrics in {folders}.")
    for path in paths:
        print(path)
    return 0
