"""``optsched plan``: flags from TrainingArguments, YAML config, report, chart, PNG, errors."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from optsched import cli
from optsched.arguments import TrainingArguments
from optsched.commands import plan as plan_command


@pytest.fixture(autouse=True)
def _plan_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    # until the lead adds "plan" to cli.COMMANDS
    monkeypatch.setitem(cli.COMMANDS, "plan", "optsched.commands.plan")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_model_report_chart_and_png(capsys, tmp_path) -> None:
    png = tmp_path / "plan.png"
    code, out, err = _run(capsys, "--steps", "50", "--warmup_steps", "5", "--lr_scheduler_type", "cosine",
                          "--png", str(png))
    assert code == 0, err
    for text in ("Param groups", "decay", "no_decay", "type cosine, warmup 5 steps, total 50 steps",
                 "Optimizer-state memory", "Learning rate per group", f"wrote {png}"):
        assert text in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _parse(*argv: str):
    return plan_command.build_parser().parse_args(list(argv))


def test_config_and_flags_become_explicit_fields(tmp_path) -> None:
    config = tmp_path / "args.yaml"
    config.write_text("learning_rate: 3e-4\noptim: sgd\nweight_decay: 0.01\n")
    args = plan_command.training_arguments_from_cfg(
        _parse("--config", str(config), "--learning-rate", "0.1", "--adam_beta1", "0.8"))
    assert args.learning_rate == 0.1 and args.optim == "sgd" and args.weight_decay == 0.01
    assert args.explicit_fields == {"learning_rate", "optim", "weight_decay", "adam_beta1"}
    # nothing given: nothing explicit, HF's defaults
    defaults = plan_command.training_arguments_from_cfg(_parse())
    assert defaults.explicit_fields == frozenset() and defaults == TrainingArguments()


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(TrainingArguments)])
def test_every_training_arguments_field_is_a_flag(field: str) -> None:
    parser = plan_command.build_parser()
    assert f"--{field}" in parser._option_string_actions


def test_max_steps_is_used_without_steps(capsys) -> None:
    code, out, _ = _run(capsys, "--max_steps", "12", "--optim", "sgd", "--adam_beta1", "0.9")
    assert code == 0
    assert "12 steps" in out and "optim='sgd'" in out and "momentum_buffer" in out


def test_custom_factory(capsys, tmp_path, monkeypatch) -> None:
    (tmp_path / "plan_factory_mod.py").write_text(
        "import torch\n"
        "def build():\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))\n"
        "    m[0].bias.requires_grad_(False)\n"
        "    return m\n"
        "def not_a_model():\n"
        "    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = _run(capsys, "--model", "plan_factory_mod:build", "--steps", "10")
    assert code == 0, err
    assert "Sequential" in out and "1 frozen tensors" in out
    code, _, err = _run(capsys, "--model", "plan_factory_mod:not_a_model", "--steps", "10")
    assert code == 2 and "not a torch.nn.Module" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "--steps"),
        (("--steps", "0"), "--steps=0"),
        (("--steps", "5", "--learning_rate", "abc"), "learning_rate"),
        (("--steps", "5", "--optim", "adamw_tourch"), "Did you mean"),
        (("--steps", "5", "--no_such_flag", "1"), "no_such_flag"),
        (("--steps", "5", "--model", "nope_module_xyz:f"), "cannot import"),
        (("--steps", "5", "--model", "optsched.demo:build_modle"), "'build_model'"),
        (("--steps", "5", "--model", "no_colon"), "MODULE:FACTORY"),
        (("--steps", "5", "--lr_scheduler_type", "reduce_lr_on_plateau", "--png", "x.png"), "no curve"),
        (("--steps", "5", "--config", "/nonexistent/args.yaml"), "args.yaml"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message) -> None:
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("flag", "value"), [("--width", "1"), ("--height", "0"), ("--width", "-3")])
def test_a_chart_size_too_small_is_refused_before_anything_is_printed(capsys, tmp_path, flag, value) -> None:
    # the whole report (and the PNG) came out before ascii_chart refused 'width=1' at the end
    png = tmp_path / "plan.png"
    code, out, err = _run(capsys, "--steps", "5", flag, value, "--png", str(png))
    assert code == 2
    assert out == "" and not png.exists()
    assert f"{flag}={value}" in err and len(err.strip().splitlines()) == 1


def test_png_without_matplotlib_names_the_extra(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = _run(capsys, "--steps", "5", "--png", str(tmp_path / "x.png"))
    assert code == 2 and "optsched[plot]" in err


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("xyz", "decay_policy='xyz' is not a known decay policy. Accepted: hf, ndim, alone or with an exemption "
                "after '+' (hf+no_embeddings, ndim+no_embeddings)."),
        ("no_embeddings", "Did you mean one of 'hf+no_embeddings', 'ndim+no_embeddings'?"),
    ],
)  # fmt: skip
def test_an_unknown_decay_policy_lists_the_plus_forms_too(capsys, policy, expected) -> None:
    code, out, err = _run(capsys, "--steps", "5", "--decay_policy", policy)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert expected in err


def test_a_short_run_draws_what_it_drew_before_sampling(capsys) -> None:
    # taken before the lr was sampled: a run of at most FULL_STEPS steps is evaluated at every step
    code, out, err = _run(capsys, "--steps", "50", "--warmup_steps", "5", "--layerwise_lr_decay", "0.5",
                          "--width", "20", "--height", "5")
    assert code == 0, err
    assert out[out.index("Learning rate per group"):] == """\
Learning rate per group
5.000e-05 |  xxx
          | xx xxxxxx
2.500e-05 | x++++++ xxxxx
          |xxooooo++++++xxxxxx
0.000e+00 |x+*********oooo+++xx
          +--------------------
           0                 49
           * decay/layer_0 = no_decay/layer_0  o decay/layer_1 = no_decay/layer_1  + decay/layer_2 = no_decay/layer_2  x decay/layer_3 = no_decay/layer_3
"""  # noqa: E501


@pytest.mark.parametrize("steps", [10**6, 10**9])
def test_a_long_run_evaluates_a_bounded_number_of_steps(capsys, tmp_path, lr_evaluations, steps) -> None:
    from optsched.schedules.sampling import GRID_STEPS

    pytest.importorskip("matplotlib")
    calls = lr_evaluations
    png = tmp_path / "plan.png"
    code, out, err = _run(capsys, "--steps", str(steps), "--warmup_steps", "100", "--layerwise_lr_decay", "0.5",
                          "--lr_scheduler_type", "warmup_stable_decay", "--lr_scheduler_kwargs",
                          '{"num_decay_steps": 1000}', "--png", str(png))
    assert code == 0, err
    # one evaluation gives every group's lr: the sample (grid, 60 columns' edges, three steps around each
    # key and critical step) and the report's key steps, whatever the number of steps and groups
    assert 0 < calls[0] <= GRID_STEPS + 2 * 60 + 3 * 7 + 2 + 5
    assert out.rstrip().endswith(f"wrote {png}") and f" {steps - 1}\n" in out


def test_a_stepped_scheduler_keeps_only_the_sampled_lrs() -> None:
    import torch

    from optsched.plan import explain

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    report = explain(optimizer, scheduler, num_training_steps=20_000)
    assert report.schedule.method == "sampled"
    steps, curves = plan_command._curves(report, optimizer, scheduler, 20_000, 60)
    assert len(steps) < 5000 and steps[-1] == 19_999  # stepped through every step, kept at the sampled ones
    assert curves["group 0"] == pytest.approx([1.0 / (1 + s) for s in steps])
