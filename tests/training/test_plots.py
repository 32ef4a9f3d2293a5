"""Training-curve plots: which panels each method gets, runs overlaid, odd metrics files, the CLI."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from alignkit.errors import AlignkitError  # noqa: E402
from alignkit.training import plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# Synthetic runs, shaped like what alignkit/training/loop.py and alignkit/methods/online_rl.py log
# --------------------------------------------------------------------------------------------------


def write_run(path, method, lines, *, raw: str = ""):
    """A run folder: alignkit_config.yaml naming ``method`` (None: no config) and metrics.jsonl."""
    path.mkdir(parents=True, exist_ok=True)
    if method is not None:
        (path / "alignkit_config.yaml").write_text(f"method: {method}\ntraining: {{output_dir: {path}}}\n")
    text = "".join(json.dumps({"time": 1.7e9 + i, **line}) + "\n" for i, line in enumerate(lines))
    (path / "metrics.jsonl").write_text(text + raw)
    return path


def sft_lines(steps=20, eval_every=5, scale=1.0):
    out = []
    for s in range(1, steps + 1):
        out.append({"step": s, "loss": scale * 2.0 / s, "lr": 1e-5 * min(1.0, s / 5), "tok/s": 900.0 + s,
                    "epoch": s / steps, "grad_norm": 1.0 + 0.1 * (s % 3)})
        if s % eval_every == 0:
            out.append({"step": s, "eval/loss": scale * 2.5 / s})
    return out


def dpo_lines(steps=20, scale=1.0):
    return [{"step": s, "loss": 0.69 - 0.01 * s, "lr": 5e-7, "tok/s": 500.0, "grad_norm": 2.0 + math.sin(s),
             "rewards/accuracies": min(1.0, scale * s / steps), "rewards/margins": scale * 0.1 * s,
             "rewards/chosen": 0.05 * s, "rewards/rejected": -0.05 * s, "logps/chosen": -50.0 + s,
             "logps/rejected": -60.0 - s, "logits/chosen": 0.1, "logits/rejected": 0.2}
            for s in range(1, steps + 1)]


def grpo_lines(steps=20, *, sources=("rm",), ppo=False):
    """On-policy GRPO with a fixed KL coefficient: clip fraction and approx KL are exactly 0."""
    out = []
    for s in range(1, steps + 1):
        reward = 0.1 * s
        line = {"step": s, "reward": reward, "reward_std": 0.3, "reward/final": reward,
                "reward/final_std": 0.3, "kl": 0.001 * s, "kl_coef": 0.04, "entropy": 1.5 - 0.01 * s,
                "loss/policy": 0.01 * math.sin(s), "loss/kl": 0.04 * 0.001 * s, "clipfrac": 0.0,
                "approx_kl": 0.0, "ratio": 1.0, "response_length": 50.0 + s, "ended_with_eos": 0.5 + 0.02 * s,
                "advantages": 0.0, "advantages_std": 1.0, "gen_share": 0.6, "step_time": 1.5, "tok/s": 2000.0,
                "lr": 1e-6, "grad_norm": 0.5, "episodes": 32 * s, "epoch": s / steps}
        # the combined reward is the sum of the sources: one source with weight 1 is the reward itself
        line.update({f"reward/{name}": reward / len(sources) + 0.01 * i for i, name in enumerate(sources)})
        if ppo:
            line.update({"loss/value": 1.0 / s, "values": 0.05 * s, "values_std": 0.1, "returns": 0.1 * s,
                         "returns_std": 0.1, "value_clipfrac": 0.1 / s, "clipfrac": 0.02 * (s % 4)})
        out.append(line)
    return out


def kd_lines(steps=10):
    out = []
    for s in range(1, steps + 1):
        out.append({"step": s, "loss": 1.0 / s, "lr": 1e-5, "tok/s": 100.0, "divergence": 1.0 / s,
                    "kl_to_teacher": 1.2 / s, "nll": 2.0 / s})
        if s % 5 == 0:
            out.append({"step": s, "eval/loss": 1.1 / s, "eval/kl_to_teacher": 1.3 / s,
                        "eval/divergence": 1.1 / s})
    return out


def figures(*run_dirs, names=None):
    return plots.build_figures(plots.load_runs(list(run_dirs), names))


def panels(fig) -> dict[str, list[str]]:
    """Panel title (without the smoothing note) -> labels of its legend lines, in drawing order.

    Lines labelled ``_raw`` are the faint unsmoothed curves under a moving average; they stay out of the
    legend and out of these lists."""
    return {ax.get_title().removesuffix(" (smoothed)"): [ln.get_label() for ln in ax.get_lines()
                                                         if not ln.get_label().startswith("_")]
            for ax in fig.axes}


def assert_png(path):
    """A PNG that is not blank: matplotlib decodes it and its pixels vary."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image[..., :3].std()) > 0.02, f"{path} looks blank"


# --------------------------------------------------------------------------------------------------
# What each method gets
# --------------------------------------------------------------------------------------------------


def test_sft_run_writes_loss_lr_speed_pngs(tmp_path, caplog):
    run = write_run(tmp_path / "sft-run", "sft", sft_lines())
    with caplog.at_level(logging.INFO, logger="alignkit"):
        paths = plots.plot_run(run)
    assert [p.name for p in paths] == ["loss.png", "lr.png", "speed.png"]
    assert all(p.parent == run / "plots" for p in paths)
    for path in paths:
        assert_png(path)
    assert not caplog.records  # drawn, not rescued by plot_run's catch-all


def test_sft_figures_train_and_eval_loss(tmp_path):
    figs = figures(write_run(tmp_path / "a", "sft", sft_lines()))
    assert panels(figs["loss"]) == {"loss": ["a: train", "a: eval"]}
    train, eval_ = figs["loss"].axes[0].get_lines()
    assert list(eval_.get_xdata()) == [5, 10, 15, 20] and eval_.get_linestyle() == "--"
    assert eval_.get_color() == train.get_color()  # one colour per run
    assert panels(figs["lr"]) == {"learning rate": ["a"], "gradient norm before clipping": ["a"]}


def test_two_runs_overlaid_one_colour_each_with_given_names(tmp_path):
    a = write_run(tmp_path / "a", "dpo", dpo_lines())
    b = write_run(tmp_path / "b", "dpo", dpo_lines(scale=0.5))
    figs = figures(a, b, names=["beta 0.1", "beta 0.5"])
    assert list(figs) == ["loss", "accuracy", "lr", "speed"]
    drawn = panels(figs["accuracy"])
    assert drawn["reward accuracy: chosen > rejected"] == ["beta 0.1", "beta 0.5"]
    assert drawn["reward margin: chosen - rejected"] == ["beta 0.1", "beta 0.5"]
    assert drawn["rewards: chosen vs rejected"] == ["beta 0.1: chosen", "beta 0.1: rejected",
                                                    "beta 0.5: chosen", "beta 0.5: rejected"]
    assert "log-probs: chosen vs rejected" in drawn
    assert "mean absolute error, regression" not in drawn  # only series that exist
    ax = figs["accuracy"].axes[0]
    assert [ln.get_color() for ln in ax.get_lines()] == ["C0", "C1"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["beta 0.1", "beta 0.5"]
    assert list(ax.get_lines()[1].get_ydata()) == [min(1.0, 0.5 * s / 20) for s in range(1, 21)]


def test_runs_of_different_lengths_look_alike(tmp_path):
    short = write_run(tmp_path / "short", "sft", sft_lines(steps=30))
    long_ = write_run(tmp_path / "long", "sft", sft_lines(steps=60))
    ax = figures(short, long_)["lr"].axes[0]
    assert [ln.get_marker() for ln in ax.get_lines()] == ["None", "None"]  # 60 points: no markers for either


def test_default_names_are_folder_names_told_apart_by_parent(tmp_path):
    a = write_run(tmp_path / "x" / "run", "sft", sft_lines())
    b = write_run(tmp_path / "y" / "run", "sft", sft_lines())
    c = write_run(tmp_path / "dpo-1", "sft", sft_lines())
    assert plots.default_names([a, b, c]) == ["x/run", "y/run", "dpo-1"]


def test_grpo_reward_band_kl_length_and_skipped_panels(tmp_path):
    figs = figures(write_run(tmp_path / "g", "grpo", grpo_lines()))
    assert list(figs) == ["loss", "reward", "kl", "length", "policy", "lr", "speed"]
    # reward/final equals reward and the only source is the reward: not drawn twice
    assert panels(figs["reward"]) == {"reward, mean ± std over samples": ["g"]}
    assert len(figs["reward"].axes[0].collections) == 1  # the std band
    # a fixed KL coefficient is flat; on-policy clip fraction and approx KL are exactly 0
    assert panels(figs["kl"]) == {"KL(policy || reference) per sequence": ["g"]}
    assert panels(figs["policy"]) == {"entropy per token": ["g"]}
    assert panels(figs["loss"]) == {"policy loss": ["g"], "KL term of the loss": ["g"]}
    assert set(panels(figs["length"])) == {"response length in tokens", "share of responses ending with EOS"}
    assert set(panels(figs["speed"])) == {"tokens/s", "share of the step spent generating"}


def test_ppo_two_sources_and_critic(tmp_path):
    figs = figures(write_run(tmp_path / "p", "ppo", grpo_lines(sources=("format", "rm"), ppo=True)))
    assert panels(figs["reward"])["reward per source, raw"] == ["p: format", "p: rm"]
    policy = panels(figs["policy"])
    assert policy["critic: values vs returns"] == ["p: values", "p: returns"]
    assert policy["clip fraction"] == ["p"] and "value clip fraction" in policy
    assert "value loss" in panels(figs["loss"])


def test_distillation_kl_to_teacher_with_eval(tmp_path):
    figs = figures(write_run(tmp_path / "kd", "kd", kd_lines()))
    assert list(figs) == ["loss", "kl", "lr", "speed"]
    assert panels(figs["kl"]) == {"KL to the teacher": ["kd: train", "kd: eval"],
                                  "training divergence": ["kd: train", "kd: eval"]}
    assert panels(figs["loss"])["NLL"] == ["kd"]


def test_mixed_methods_take_the_union_and_unknown_methods_every_group(tmp_path):
    sft = write_run(tmp_path / "sft", "sft", sft_lines())
    dpo = write_run(tmp_path / "dpo", "dpo", dpo_lines())
    assert list(figures(sft, dpo)) == ["loss", "accuracy", "lr", "speed"]
    assert [g.name for g in plots.groups_for(["sft"])] == ["loss", "lr", "speed"]
    assert plots.groups_for(["sft", None]) == list(plots.GROUPS)
    assert plots.groups_for(["a-new-method"]) == list(plots.GROUPS)
    # no config at all: whatever known keys exist
    bare = write_run(tmp_path / "bare", None, grpo_lines())
    assert list(figures(bare)) == ["loss", "reward", "kl", "length", "policy", "lr", "speed"]


def test_every_registered_method_has_its_groups():
    from alignkit.methods import METHODS

    assert set(plots.METHOD_GROUPS) == set(METHODS)


def test_config_file_name_matches_the_checkpoint_module():
    from alignkit.training.checkpoint import CONFIG_FILE

    assert plots.CONFIG_FILE == CONFIG_FILE


def test_long_series_are_smoothed_under_a_faint_raw_curve(tmp_path):
    lines = [{"step": s, "loss": 1.0 + (0.5 if s % 2 else -0.5), "lr": 1e-5} for s in range(1, 201)]
    figs = figures(write_run(tmp_path / "long", "sft", lines))
    ax = figs["loss"].axes[0]
    assert ax.get_title() == "loss (smoothed)"
    raw, smoothed = ax.get_lines()
    assert raw.get_label() == "_raw" and raw.get_alpha() < 0.5
    assert max(abs(v - 1.0) for v in smoothed.get_ydata()[5:-5]) < 0.2  # the alternation averages out
    assert figs["lr"].axes[0].get_title() == "learning rate"  # a schedule is not smoothed


def test_smooth_ignores_nans_and_keeps_the_ends():
    out = plots.smooth([1.0] * 50 + [math.nan] + [1.0] * 60)
    assert len(out) == 111 and all(v == pytest.approx(1.0) for v in out)
    assert all(math.isnan(v) for v in plots.smooth([math.nan] * 5))
    falling = [10.0] + [1.0] * 299  # the first point is not averaged away
    assert plots.smooth(falling)[0] == 10.0 and plots.smooth(falling)[1] == pytest.approx(4.0)
    assert plots.smooth(list(range(300))) == pytest.approx(list(range(300)))  # a straight line stays put


# --------------------------------------------------------------------------------------------------
# Odd metrics files never raise
# --------------------------------------------------------------------------------------------------


def test_read_metrics_resumed_run_later_lines_win(tmp_path):
    # steps 1-6 logged, crash, resume from the checkpoint at step 3: 4-6 are logged again, differently
    first = [{"step": s, "loss": 10.0 + s} for s in range(1, 7)] + [{"step": 6, "eval/loss": 99.0}]
    second = [{"step": s, "loss": float(s)} for s in range(4, 9)]
    run = write_run(tmp_path / "r", "sft", first + second)
    series = plots.read_metrics(run / "metrics.jsonl")
    assert series["loss"] == ([1, 2, 3, 4, 5, 6, 7, 8], [11.0, 12.0, 13.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    assert "eval/loss" not in series  # the stale eval of the crashed run is gone, too


def test_read_metrics_repeated_step_later_line_wins(tmp_path):
    run = write_run(tmp_path / "r", "sft", [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
                                            {"step": 2, "loss": 1.5}, {"step": 2, "eval/loss": 1.7}])
    series = plots.read_metrics(run / "metrics.jsonl")
    assert series["loss"] == ([1, 2], [3.0, 1.5]) and series["eval/loss"] == ([2], [1.7])


def test_read_metrics_skips_what_is_not_a_number(tmp_path):
    lines = [{"step": 1, "loss": 1.0, "note": "text", "flag": None, "list": [1]},
             {"step": 2, "loss": float("nan")}, {"step": 3, "loss": float("inf")}, {"loss": 5.0},
             {"step": "4", "loss": 4.0}]
    raw = "\n[1, 2]\n\"string\"\n{\"step\": 5, \"loss\": 0.5}\n{\"step\": 6, \"loss\": 0."  # truncated last
    series = plots.read_metrics(write_run(tmp_path / "r", "sft", lines, raw=raw) / "metrics.jsonl")
    assert set(series) == {"loss"}
    steps, values = series["loss"]
    assert steps == [1, 2, 3, 5] and values[0] == 1.0 and values[3] == 0.5
    assert math.isnan(values[1]) and math.isnan(values[2])  # NaN and Inf become gaps


def test_read_metrics_recovers_a_line_appended_to_a_partial_one(tmp_path):
    # the crash left '{"step": 3, "lo' without a newline; the resumed run appended its first line to it
    raw = '{"step": 3, "lo' + json.dumps({"step": 3, "loss": 0.3}) + "\n"
    raw += json.dumps({"step": 4, "loss": 0.2})
    run = write_run(tmp_path / "r", "sft", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}], raw=raw)
    assert plots.read_metrics(run / "metrics.jsonl")["loss"] == ([1, 2, 3, 4], [1.0, 0.5, 0.3, 0.2])


def test_read_metrics_missing_or_binary_file(tmp_path):
    assert plots.read_metrics(tmp_path / "nope.jsonl") == {}
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    assert plots.read_metrics(tmp_path / "bin.jsonl") == {}


@pytest.mark.parametrize("content", ["", "\n\n", '{"step": 1, "lo', '{"step": 1, "time": 5.0}\n',
                                     '{"step": 1, "loss": NaN}\n{"step": 2, "loss": NaN}\n'])
def test_plot_run_with_nothing_to_draw_writes_nothing_and_does_not_raise(tmp_path, caplog, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(content)
    with caplog.at_level(logging.INFO, logger="alignkit"):
        assert plots.plot_run(run) == []
    assert not (run / "plots").exists() and not caplog.records


def test_plot_run_odd_but_drawable_data(tmp_path, caplog):
    lines = [{"step": 1, "loss": 2.0, "tok/s": "fast"}, {"step": 2, "loss": float("nan")},
             {"step": 3, "loss": float("inf"), "eval/loss": 1.0}, {"step": 4, "loss": 1.0},
             {"step": 2, "loss": 1.5}]  # resumed from step 1
    run = write_run(tmp_path / "odd", None, lines, raw='{"step": 3, "loss": 0.')
    (run / "alignkit_config.yaml").write_text("method: [unclosed\n")  # unreadable config: every group
    with caplog.at_level(logging.INFO, logger="alignkit"):
        paths = plots.plot_run(run)
    assert [p.name for p in paths] == ["loss.png"] and not caplog.records
    assert_png(paths[0])


def test_plot_run_without_a_metrics_file(tmp_path):
    assert plots.plot_run(tmp_path) == []
    assert plots.plot_run(tmp_path / "missing") == []


def test_plot_run_logs_one_line_without_matplotlib(tmp_path, monkeypatch, caplog):
    run = write_run(tmp_path / "run", "sft", sft_lines())
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails
    with caplog.at_level(logging.INFO, logger="alignkit"):
        assert plots.plot_run(run) == []
    assert len(caplog.records) == 1 and "matplotlib" in caplog.records[0].getMessage()
    assert not (run / "plots").exists()


def test_plot_run_never_raises_on_a_bug(tmp_path, monkeypatch, caplog):
    run = write_run(tmp_path / "run", "sft", sft_lines())

    def broken(runs):
        raise RuntimeError("boom")

    monkeypatch.setattr(plots, "build_figures", broken)
    with caplog.at_level(logging.INFO, logger="alignkit"):
        assert plots.plot_run(run) == []
    assert len(caplog.records) == 1 and "boom" in caplog.records[0].getMessage()


def test_no_pyplot_state(tmp_path):
    had_pyplot = "matplotlib.pyplot" in sys.modules
    figs = figures(write_run(tmp_path / "a", "sft", sft_lines()))
    assert all(type(f).__name__ == "Figure" and f.canvas.__class__.__name__ == "FigureCanvasAgg"
               for f in figs.values())
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules
    else:
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []


# --------------------------------------------------------------------------------------------------
# plot_runs and the CLI
# --------------------------------------------------------------------------------------------------


def test_plot_runs_writes_the_rl_pngs_into_out_dir(tmp_path):
    a = write_run(tmp_path / "a", "grpo", grpo_lines(sources=("format", "rm")))
    paths = plots.plot_runs([a], tmp_path / "cmp")  # overlays are checked on the figures above
    assert [p.name for p in paths] == [f"{g}.png" for g in ("loss", "reward", "kl", "length", "policy", "lr",
                                                            "speed")]
    assert_png(tmp_path / "cmp" / "reward.png")


def test_plot_runs_errors(tmp_path):
    a = write_run(tmp_path / "a", "sft", sft_lines())
    with pytest.raises(AlignkitError, match="2 name"):
        plots.plot_runs([a], tmp_path / "out", names=["x", "y"])
    with pytest.raises(AlignkitError, match="no run folder"):
        plots.plot_runs([], tmp_path / "out")


@pytest.fixture
def saved(monkeypatch):
    """Records what plot_main would save (out dir, group -> legend labels) instead of rendering PNGs."""
    calls = []

    def record(figs, out_dir):
        calls.append((out_dir, {name: panels(fig) for name, fig in figs.items()}))
        return [out_dir / f"{name}.png" for name in figs]

    monkeypatch.setattr(plots, "save_figures", record)
    return calls


def test_cli_one_run_defaults_to_its_plots_folder(tmp_path, capsys, saved):
    run = write_run(tmp_path / "run", "sft", sft_lines())
    assert plots.plot_main([str(run)]) == 0
    assert saved[0][0] == run / "plots"
    printed = capsys.readouterr().out.split()
    assert printed == [str(run / "plots" / n) for n in ("loss.png", "lr.png", "speed.png")]


def test_cli_several_runs_default_to_plots_here_with_names(tmp_path, monkeypatch, saved):
    a = write_run(tmp_path / "a", "dpo", dpo_lines())
    b = write_run(tmp_path / "b", "dpo", dpo_lines(scale=0.5))
    monkeypatch.chdir(tmp_path)
    assert plots.plot_main([str(a), str(b), "--names", "base, tuned"]) == 0
    out_dir, drawn = saved[0]
    assert out_dir == Path("plots") and list(drawn) == ["loss", "accuracy", "lr", "speed"]
    assert drawn["accuracy"]["reward margin: chosen - rejected"] == ["base", "tuned"]
    assert plots.plot_main([str(a), str(b), "--out", str(tmp_path / "elsewhere")]) == 0
    out_dir, drawn = saved[1]
    assert out_dir == tmp_path / "elsewhere"
    assert drawn["accuracy"]["reward margin: chosen - rejected"] == ["a", "b"]  # folder names


@pytest.mark.parametrize("make", ["empty folder", "missing folder"])
def test_cli_folder_without_metrics_is_a_one_line_error_naming_it(tmp_path, make):
    good = write_run(tmp_path / "good", "sft", sft_lines())
    bad = tmp_path / "not-a-run"
    if make == "empty folder":
        bad.mkdir()
    with pytest.raises(AlignkitError) as err:
        plots.plot_main([str(good), str(bad)])
    message = str(err.value)
    assert str(bad) in message and "\n" not in message
    assert not (tmp_path / "plots").exists() and not (good / "plots").exists()  # nothing half-done


def test_cli_nothing_to_plot_and_wrong_names(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(AlignkitError, match="nothing to plot"):
        plots.plot_main([str(empty)])
    run = write_run(tmp_path / "run", "sft", sft_lines())
    with pytest.raises(AlignkitError, match="one name per run"):
        plots.plot_main([str(run), "--names", "a,b"])


def test_corrupt_metrics_lines_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    """Damaged lines were dropped without a word; a crash's cut last line stays quiet (tested above)."""
    raw = 'garbage\n{"step": 3, "loss": 0.5}\n{"step": 4, "loss" 0.4}\n{"step": 5, "loss": 0.3}\n'
    run = write_run(tmp_path / "r", "sft", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.8}], raw=raw)
    with caplog.at_level(logging.WARNING, logger="alignkit"):
        series = plots.read_metrics(run / "metrics.jsonl")
    assert series["loss"] == ([1, 2, 3, 5], [1.0, 0.8, 0.5, 0.3])
    assert [r.getMessage() for r in caplog.records] == [
        f"{run / 'metrics.jsonl'}: skipped 2 line(s) that are not JSON records (line 3, 5); their metrics are not "
        "plotted."]


def test_plot_out_on_an_existing_file_is_one_line(tmp_path, capsys):
    """`alignkit plot RUN --out FILE` ended in a FileExistsError traceback."""
    from alignkit.cli import main

    run = write_run(tmp_path / "r", "sft", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.8}])
    taken = tmp_path / "plots.png"
    taken.write_text("x")
    for out, why in ((taken, ""), (taken / "sub", f" ({taken} is a file)")):
        assert main(["plot", str(run), "--out", str(out)]) == 2
        assert capsys.readouterr().err == (f"alignkit: error: {out}: not a folder{why}; write the plots to another "
                                           "folder (--out DIR).\n")
