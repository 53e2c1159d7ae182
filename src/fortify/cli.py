"""The ``fortify`` command line: run, train and evaluate.

Each command resolves a RunConfig from an optional YAML file plus flags (flags win), validates
everything before writing, and prints FortifyErrors as one line without a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn
from typer.core import TyperGroup

from fortify.allocator import keep_freed_memory_unless_declined
from fortify.attacks import ATTACKS
from fortify.config import MAX_REFERENCE_MODELS, TrainConfig, load_config, read_yaml_mapping
from fortify.errors import ConfigError, FortifyError
from fortify.models.onednn_linear import read_setting as read_onednn_linear_setting
from fortify.pipeline import (
    LIRA_NEEDS_RECIPE,
    Setup,
    analyse_model,
    audit_membership,
    audited_dataset,
    check_data_fits_model,
    check_data_unchanged,
    check_flags_are_read,
    check_same_settings,
    default_out_dir,
    discarded_on_error,
    encoding_for_other_table,
    evaluate_model,
    evaluation_config,
    fresh_out_dir,
    generic_settings_in_file,
    lira_query_views,
    lira_recipe,
    load_trained_model,
    prepare,
    provenance,
    train_model,
    write_json,
)
from fortify.report import tables
from fortify.report.compare import write_comparison
from fortify.report.html import write_report
from fortify.report.results import RESULTS_VERSION, load_results
from fortify.tabular.run import tabular_section
from fortify.training import checkpoint as ckpt
from fortify.training import distributed


class _Commands(TyperGroup):
    """Lists every command when an unknown one is given (click names only close matches)."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            ctx.fail(f"no such command {name!r}; valid: {', '.join(self.list_commands(ctx))}")
        return super().resolve_command(ctx, args)


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True,
                  help="Harden PyTorch classifiers with adversarial training and measure it.")
console = Console(stderr=True)
# what a command prints on stdout (paths, names, tables) is text, never rich markup: "[...]" in a
# directory or dataset name stays as it is
out_console = Console(markup=False)
F = TypeVar("F", bound=Callable[..., Any])

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML run configuration.")]
DatasetOpt = Annotated[str | None, typer.Option(help="Dataset name (see the registry).")]
DataPathOpt = Annotated[Path | None, typer.Option("--data-path", "--data",
                                                  help="Data file for the npz or csv dataset.")]
TargetOpt = Annotated[str | None, typer.Option(help="Label column of a csv file.")]
SchemaOpt = Annotated[str | None, typer.Option(help="Tabular schema: YAML file or bundled name "
                                                    "(breast-cancer).")]
EpsOpt = Annotated[float | None, typer.Option(help="Perturbation budget eps (> 0).")]
NormOpt = Annotated[str | None, typer.Option(help="Threat-model norm: linf or l2.")]
EpochsOpt = Annotated[int | None, typer.Option(help="Training epochs (>= 1).")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed of the data split and of training (the attacks' "
                                                  "is eval.seed).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")]


# what to do after Ctrl-C, by command: the commands that keep a checkpoint or a journal; {out} is
# " --out DIR" and {with_out} " with --out DIR" when the command chose its run directory itself (a
# rerun without it would choose anew), else empty
_AFTER_INTERRUPT = {"run": "rerun the same command with --resume{out} to continue",
                    "train": "rerun the same command with --resume{out} to continue",
                    "evaluate": "rerun the same command{with_out} to continue (finished batches are kept), "
                                "or add --restart to start afresh",
                    "sweep": "rerun the same command{with_out} to continue (finished runs are kept)",
                    "federate": "rerun the same command with --resume{out} to continue from the last "
                                "finished round"}
# the run directory the current command chose itself, no --out given (_out_or_default)
_chosen_out_dir: Path | None = None


def _out_or_default(out: Path | None, stem: str, *, resume: bool = False) -> Path | None:
    """``out``; without it a new directory under runs/ (none when resuming, which needs --out),
    printed before any work so that an interrupted run can be named with --out to continue it."""
    global _chosen_out_dir
    if out is not None or resume:
        return out
    _chosen_out_dir = default_out_dir(stem)
    console.print(f"run directory: {_chosen_out_dir}", highlight=False, markup=False)
    return _chosen_out_dir


def _print_error(message: str) -> None:
    # escaped: rich would read "[nan, 1]" or "[low, high]" in a message as markup and drop it
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     line: str | None = None) -> str:
    """A warning as the command line shows it: one line, like its errors, without the source line."""
    return f"warning: {message}\n"


def _handles_errors(command: F) -> F:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _chosen_out_dir
        _chosen_out_dir = None
        try:
            return command(*args, **kwargs)
        except FortifyError as err:
            _print_error(str(err))
            raise typer.Exit(2) from None
        except OSError as err:  # a file or directory that cannot be read or written
            _print_error(_describe_os_error(err))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            hint = _AFTER_INTERRUPT.get(command.__name__)
            if hint is not None:
                out = "" if _chosen_out_dir is None else f" --out {_chosen_out_dir}"
                hint = hint.format(out=out, with_out=out and f" with{out}")
            console.print("[yellow]interrupted[/]" + (f": {escape(hint)}" if hint else ""), highlight=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _describe_os_error(err: OSError) -> str:
    where = f" {err.filename}" if err.filename is not None else ""
    if isinstance(err, (FileExistsError, NotADirectoryError)):  # from creating an output's folders
        return f"cannot use{where}: a file stands where a folder is needed; choose another path"
    return f"cannot use{where}: {err.strerror or err}"


def _overrides(**sections: dict[str, Any]) -> dict[str, Any]:
    """Nested overrides from flags that were given (None means 'not given')."""
    return {section: {k: v for k, v in values.items() if v is not None}
            for section, values in sections.items()
            if any(v is not None for v in values.values())}


def _attack_list(attacks: str | None) -> list[str] | None:
    """``--attacks a,b`` as a list; an empty name (``--attacks ''``, ``a,,b``) is an error, not the
    default list."""
    if attacks is None:
        return None
    names = [name.strip() for name in attacks.split(",")]
    if not all(names):
        raise ConfigError(f"--attacks {attacks!r} has an empty name; give comma-separated attack names "
                          f"from {', '.join(ATTACKS.names())}")
    return names


# -- fortify run -------------------------------------------------------------------------------

@app.command()
@_handles_errors
def run(
    config: ConfigOpt = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/<dataset>-<time>).")] = None,
    dataset: DatasetOpt = None,
    data_path: DataPathOpt = None,
    target: TargetOpt = None,
    schema: SchemaOpt = None,
    eps: EpsOpt = None,
    norm: NormOpt = None,
    epochs: EpochsOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a standard and a PGD-trained model, attack both, write results and a report."""
    cfg = load_config(config, _overrides(data={"name": _dataset_name(dataset, data_path), "seed": seed,
                                               "path": data_path, "target": target,
                                               "feature_schema": schema},
                                         threat={"eps": eps, "norm": norm},
                                         train={"epochs": epochs, "seed": seed}))
    default_objective = TrainConfig.model_fields["objective"].default
    if cfg.train.objective != default_objective:  # set in the config file, and read by nothing here
        raise ConfigError(f"fortify run trains a standard and a pgd model, so train.objective="
                          f"{cfg.train.objective!r} does not apply; train it with fortify train "
                          "--objective, or compare objectives with fortify sweep")
    check_flags_are_read(cfg.eval, generic_settings_in_file(config))
    setup = prepare(cfg, device, objectives=("standard", "pgd"))
    out_dir = fresh_out_dir(_out_or_default(out, cfg.data.name, resume=resume), cfg.data.name, resume,
                            command="run", marker="config.yaml")  # its first file
    if resume:
        check_same_settings(out_dir, cfg)  # before config.yaml is written over
    with discarded_on_error(out_dir):
        # models/ first: it marks the directory as a run's, so that one cut off before its first
        # checkpoint is not taken for a train directory by train --resume (both hold config.yaml)
        (out_dir / "models").mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())  # --resume reads it first
        # a resumed run's seconds include the training its checkpoints hold; what it redoes is timed anew
        earlier = _checkpointed_training_seconds(out_dir / "models", ("standard", "pgd")) if resume else 0.0
        started = time.perf_counter()
        models = {}
        for objective in ("standard", "pgd"):
            console.print(f"training [bold]{objective}[/] model on {escape(cfg.data.name)}")
            model, training = train_model(setup, objective, out_dir / "models" / objective,
                                          resume=resume, show_progress=not quiet)
            console.print(f"attacking [bold]{objective}[/] model")
            models[objective] = _measure(setup, model, training.to_dict(), objective)
    results = _results(setup, models, earlier + time.perf_counter() - started)
    write_json(out_dir / "results.json", results)
    write_report(load_results(out_dir), out_dir / "report.html")
    _print_comparison(results)
    out_console.print(f"results: {out_dir / 'results.json'}\nreport:  {out_dir / 'report.html'}")


def _checkpointed_training_seconds(models_dir: Path, names: tuple[str, ...]) -> float:
    """Training seconds already recorded in the checkpoints of ``models_dir/<name>`` (0 where none)."""
    states = [models_dir / name for name in names if (models_dir / name / ckpt.STATE_JSON).is_file()]
    return sum(float(ckpt.read_state_json(path).get("progress", {}).get("seconds", 0.0)) for path in states)


def _measure(setup: Setup, model: nn.Module, training: dict[str, Any], objective: str) -> dict[str, Any]:
    """Robustness, the report's analysis and the membership audit of one trained model."""
    robustness = evaluate_model(setup, model)
    return {"training": training, "robustness": robustness.to_dict(), **_tabular_section(setup, model),
            **_measure_further(setup, model, robustness, objective)}


def _measure_further(setup: Setup, model: nn.Module, robustness: Any, objective: str | None,
                     card: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report's analysis and the membership audit, as the configuration's analysis section asks;
    ``objective`` is what the model trained with (None for a model from elsewhere), ``card`` its
    model directory's card (None: the model ``setup`` builds)."""
    measured = {}
    if setup.config.analysis.enabled:
        console.print("  margins, certified radius, gradient-masking checks")
        measured["analysis"] = analyse_model(setup, model, robustness, objective).to_dict()
    if setup.config.analysis.privacy:
        console.print("  membership inference")
        measured["privacy"] = audit_membership(setup, model, objective, card).to_dict()
    return measured


def _results(setup: Setup, models: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {"version": RESULTS_VERSION, "kind": "comparison",
            "config": setup.config.model_dump(mode="json"), "dataset": setup.dataset.summary(),
            "threat": setup.threat.to_dict(),
            "models": models, "seconds": seconds,
            "provenance": provenance(setup.config, setup.device)}


def _print_comparison(results: dict[str, Any]) -> None:
    threat = results["threat"]
    table = Table(title=f"{results['dataset']['name']}: {threat['norm']} eps={threat['eps']:.4g}")
    # cells lined up by attack name, as the page's table: merged runs need not share their attacks
    attack_names, accuracy = tables.attack_accuracy(results["models"])
    for column in ["model", "clean", *attack_names, "worst case"]:
        table.add_column(column, justify="right")
    for name, model in results["models"].items():
        rob = model["robustness"]
        cells = [rob["clean_accuracy"], *[accuracy[name][a] for a in attack_names],
                 rob["worst_case_accuracy"]]
        table.add_row(name, *["n/a" if c is None else f"{100 * c:.1f}%" for c in cells])
    out_console.print(table)


# -- fortify train -----------------------------------------------------------------------------

@app.command()
@_handles_errors
def train(
    config: ConfigOpt = None,
    out: Annotated[Path | None, typer.Option(
        help="Model directory (default runs/<dataset>-<objective>-<time>).")] = None,
    dataset: DatasetOpt = None,
    data_path: DataPathOpt = None,
    target: TargetOpt = None,
    schema: SchemaOpt = None,
    model: Annotated[str | None, typer.Option(help="Model name (default: the dataset's).")] = None,
    objective: Annotated[str | None, typer.Option(
        help="Training method: standard, fgsm, fgsm-rs, pgd, trades, mart, free, awp-pgd, awp-trades, "
        "pgd-mix or gaussian.")] = None,
    eps: EpsOpt = None,
    norm: NormOpt = None,
    epochs: EpochsOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (>= 1).")] = None,
    lr: Annotated[float | None, typer.Option(
        help="Peak learning rate (> 0; default 0.05, 0.02 for free).")] = None,
    attack_steps: Annotated[int | None, typer.Option(help="PGD steps during training.")] = None,
    amp: Annotated[str | None, typer.Option(
        help="bf16: train under bf16 autocast (CUDA, or a CPU with native bf16).")] = None,
    channels_last: Annotated[bool | None, typer.Option(
        "--channels-last/--no-channels-last", help="Train with conv weights and image batches stored NHWC "
        "(default: on CPU when the model runs so, where it is faster).")] = None,
    cuda_graph: Annotated[bool | None, typer.Option(
        "--cuda-graph/--no-cuda-graph", help="On a GPU: record the training step once as a CUDA graph "
        "and replay it (standard, fgsm, fgsm-rs, pgd, trades; no compilation).")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
    nproc: Annotated[int | None, typer.Option(help="Data-parallel processes (runs torchrun).")] = None,
    dp: Annotated[bool | None, typer.Option("--dp", help="Differentially private training (DP-SGD).")] = None,
    target_epsilon: Annotated[float | None, typer.Option(help="DP: epsilon spent by the last epoch.")] = None,
    noise_multiplier: Annotated[float | None, typer.Option(help="DP: fixed noise instead.")] = None,
    delta: Annotated[float | None, typer.Option(help="DP: delta (< 1/n; default 1e-5).")] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help="DP: per-example clip norm.")] = None,
    max_physical_batch_size: Annotated[int | None, typer.Option(help="DP: split larger batches.")] = None,
    accountant: Annotated[str | None, typer.Option(help="DP: prv or rdp.")] = None,
    canaries: Annotated[int | None, typer.Option(
        help="Audit with N mislabelled canaries a side (with or without --dp).")] = None,
) -> None:
    """Train one model (any objective) into a model directory."""
    # before the config: its own check names dp.* settings, this one the flags given
    _check_dp_flags_need_dp(dp or _file_enables_dp(config), target_epsilon=target_epsilon,
                            noise_multiplier=noise_multiplier, delta=delta, max_grad_norm=max_grad_norm,
                            max_physical_batch_size=max_physical_batch_size, accountant=accountant)
    cfg = load_config(config, _overrides(
        data={"name": _dataset_name(dataset, data_path), "path": data_path, "seed": seed,
              "target": target, "feature_schema": schema},
        model={"name": model}, threat={"eps": eps, "norm": norm},
        train={"objective": objective, "epochs": epochs, "batch_size": batch_size, "lr": lr,
               "attack_steps": attack_steps, "seed": seed, "amp": _training_amp(amp),
               "channels_last": channels_last, "cuda_graph": cuda_graph},
        dp={"enabled": dp, "target_epsilon": target_epsilon, "noise_multiplier": noise_multiplier,
            "delta": delta, "max_grad_norm": max_grad_norm, "accountant": accountant,
            "max_physical_batch_size": max_physical_batch_size, "canaries": canaries}))
    stem = f"{cfg.data.name}-{cfg.train.objective}"
    if nproc is not None and nproc != 1 and not distributed.under_torchrun():
        # settings every rank would refuse alike are refused once, here, before any rank starts
        if cfg.dp.enabled:
            raise ConfigError("--dp cannot be combined with --nproc: DP-SGD trains in one process")
        chosen = _out_or_default(out, stem, resume=resume)
        fresh_out_dir(chosen, stem, resume, command="train", marker="config.yaml")
        argv = distributed.without_option(sys.argv[1:], "--nproc")
        # every rank must write to one directory: the one chosen here, named to them all
        argv += ["--out", str(chosen)] if out is None else []
        raise typer.Exit(distributed.launch(nproc, argv))
    setup, ddp = _join_torchrun(prepare(cfg, device), out)
    out_dir = fresh_out_dir(_out_or_default(out, stem, resume=resume), stem, resume, command="train",
                            marker="config.yaml")
    if ddp is not None:
        ddp.barrier()  # every rank has checked out_dir before rank 0 writes into it
    # a failure before the first checkpoint takes back what it wrote (under torchrun, rank 0 wrote it)
    with discarded_on_error(out_dir) if ddp is None or ddp.is_main else contextlib.nullcontext():
        _, result = train_model(setup, cfg.train.objective, out_dir, resume=resume,
                                show_progress=not quiet and (ddp is None or ddp.is_main), distributed=ddp)
    if ddp is not None:  # no collective follows: every rank tears the group down, together
        ddp.leave()
        if not ddp.is_main:
            return
    write_json(out_dir / "training.json", result.to_dict())
    selected = result.selected_epoch or result.best_epoch
    kept = result.history[selected - 1]
    how = "selected" if cfg.train.early_stopping else (
        f"kept (the last; early stopping is off, the best on validation was epoch {result.best_epoch})"
        if result.best_epoch != selected else "kept (the last, also the best on validation)")
    out_console.print(
        f"trained {cfg.train.objective} model: epoch {selected} {how}, val clean "
        f"{100 * kept.val_clean_accuracy:.1f}%"
        + (f", val robust {100 * kept.val_robust_accuracy:.1f}%"
           if kept.val_robust_accuracy is not None else "")
        + f"\nmodel: {out_dir / 'model.safetensors'}")
    _print_privacy(result.to_dict())


def _file_enables_dp(config: Path | None) -> bool:
    """Whether the config file sets dp.enabled: true."""
    section = read_yaml_mapping(config).get("dp")
    return isinstance(section, dict) and section.get("enabled") is True


def _check_dp_flags_need_dp(enabled: bool, **flags: Any) -> None:
    """A DP flag without DP would be dropped without a word; the run would not be private."""
    given = [f"--{name.replace('_', '-')}" for name, value in flags.items() if value is not None]
    if given and not enabled:
        verb = "applies" if len(given) == 1 else "apply"
        raise ConfigError(f"{', '.join(given)} only {verb} to DP training: add --dp (or dp.enabled: true)")


def _training_amp(amp: str | None) -> bool | None:
    """``--amp bf16`` as ``train.amp``: training autocasts to bf16 only (fp16 would need loss scaling)."""
    if amp is None:
        return None
    if amp != "bf16":
        raise ConfigError(f"unknown training precision --amp {amp!r}; valid: bf16")
    return True


def _print_privacy(training: dict[str, Any]) -> None:
    """The accountant's epsilon and the canary audit's lower bound, when the run has them."""
    privacy, audit = training.get("privacy"), training.get("canary_audit")
    if privacy is not None:
        out_console.print(f"DP: epsilon {privacy['epsilon']:.3g} (delta {privacy['delta']:g}, "
                          f"{privacy['accountant']}), noise multiplier {privacy['noise_multiplier']:.3g}, "
                          f"clip {privacy['max_grad_norm']:g}"
                          + "".join(f"\nreplaced {m}" for m in privacy["replaced_modules"]))
    if audit is not None:
        out_console.print(f"canary audit: epsilon >= {audit['epsilon_lower']:.3g} at "
                          f"{100 * audit['confidence']:.0f}% confidence ({audit['n_inserted']} inserted, "
                          f"{audit['n_held_out']} held out; canary AUC {audit['auc']:.3f})")


def _join_torchrun(setup: Setup, out: Path | None) -> tuple[Setup, distributed.DistributedContext | None]:
    """Under torchrun: join the process group; each rank takes its own GPU on CUDA."""
    ddp = distributed.join(setup.device)
    if ddp is None:
        return setup, None
    if out is None:
        raise ConfigError("under torchrun pass --out (or the model directory): every process must "
                          "use the same directory")
    return dataclasses.replace(setup, device=ddp.device), ddp


# -- fortify evaluate --------------------------------------------------------------------------

@app.command()
@_handles_errors
def evaluate(
    model_dir: Annotated[Path | None, typer.Argument(help="Model directory from fortify train.")] = None,
    config: ConfigOpt = None,
    attacks: Annotated[str | None, typer.Option(help="Comma-separated attack names.")] = None,
    preset: Annotated[str | None, typer.Option(help="autoattack: APGD-CE, APGD-T, FAB-T, Square.")] = None,
    eps: EpsOpt = None,
    norm: NormOpt = None,
    steps: Annotated[int | None, typer.Option(help="Iterations of every gradient attack.")] = None,
    restarts: Annotated[int | None, typer.Option(help="Restarts (>= 1).")] = None,
    queries: Annotated[int | None, typer.Option(help="Query budget of black-box attacks.")] = None,
    surrogate: Annotated[Path | None, typer.Option(help="Model directory for the transfer attack.")] = None,
    cascade: Annotated[bool | None, typer.Option(help="Attack only examples still robust.")] = None,
    n_examples: Annotated[int | None, typer.Option(help="Use the first N test examples.")] = None,
    amp: Annotated[str | None, typer.Option(help="bf16 or fp16: attack under autocast, checked "
                                            "against fp32 on the first examples.")] = None,
    channels_last: Annotated[bool | None, typer.Option(
        "--channels-last/--no-channels-last", help="Attack with conv weights stored NHWC (default: on "
        "CPU when the model runs so, where it is faster).")] = None,
    device: DeviceOpt = "auto",
    model_file: Annotated[Path | None, typer.Option("--model", help="A Keras (.keras, .h5) or ONNX "
                                                    "(.onnx) model file to evaluate instead.")] = None,
    dataset: DatasetOpt = None,
    layout: Annotated[str, typer.Option(help="With --model: its input layout, auto, nchw or nhwc.")] = "auto",
    input_range: Annotated[str | None, typer.Option(help="With --model: the values it expects, e.g. "
                                                    "0,255 (default: the dataset's box).")] = None,
    mean: Annotated[str | None, typer.Option(help="With --model: per-channel mean it expects "
                                             "subtracted, e.g. 0.5,0.5,0.5.")] = None,
    std: Annotated[str | None, typer.Option(help="With --model: per-channel std it divides by.")] = None,
    out: Annotated[Path | None, typer.Option(help="With --model: directory for robustness.json.")] = None,
    with_report: Annotated[bool, typer.Option("--report", help="Also measure margins, certified radius, "
                                              "masking checks and membership inference, and write "
                                              "report.html.")] = False,
    restart: Annotated[bool, typer.Option(help="Discard an interrupted evaluation's journal and "
                                          "evaluate from the start.")] = False,
) -> None:
    """Attack a trained model (or a Keras/ONNX file); writes robustness.json (resumable)."""
    attack_list = _attack_list(attacks)
    if preset is not None and (attack_list is not None or cascade is False):
        flag = "--attacks" if attack_list is not None else "--no-cascade"
        raise ConfigError(f"--preset {preset} runs its own attacks as a cascade; {flag} does not apply to it")
    flags = (("--steps", "steps", steps), ("--restarts", "restarts", restarts),
             ("--queries", "queries", queries), ("--surrogate", "surrogate", surrogate))
    generic = [(flag, setting) for flag, setting, value in flags if value is not None]
    generic += generic_settings_in_file(config)
    overrides = _overrides(
        threat={"eps": eps, "norm": norm},
        eval={"attacks": attack_list, "preset": preset, "steps": steps, "restarts": restarts,
              "queries": queries, "surrogate": surrogate, "cascade": cascade,
              "n_examples": n_examples, "amp": amp, "channels_last": channels_last})
    if model_file is not None:
        if model_dir is not None:
            raise ConfigError(f"give a model directory ({model_dir}) or --model {model_file}, not both")
        if distributed.under_torchrun():  # every rank would attack everything and write the same files
            raise ConfigError("--model FILE is evaluated in one process; sharded evaluation under torchrun "
                              "takes a model directory")
        _evaluate_model_file(model_file, config, overrides, dataset=dataset, layout=layout,
                             input_range=input_range, mean=mean, std=std, device=device, out=out,
                             attacks_chosen=attack_list is not None or preset is not None, generic=generic,
                             with_report=with_report, restart=restart)
        return
    if model_dir is None:
        raise ConfigError("give a MODEL_DIR written by fortify train, or --model FILE (.keras, .h5, .onnx)")
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir} is not a directory: give a MODEL_DIR written by fortify train, "
                          "or --model FILE for a Keras or ONNX file")
    given = (("--dataset", dataset), ("--out", out), ("--input-range", input_range), ("--mean", mean),
             ("--std", std))
    file_only = [flag for flag, value in given if value is not None]
    file_only += ["--layout"] if layout != "auto" else []
    if file_only:  # a model directory is evaluated on its own data, into itself
        verb = "goes" if len(file_only) == 1 else "go"
        raise ConfigError(f"{' and '.join(file_only)} {verb} with --model FILE; a MODEL_DIR knows its own "
                          "input layout and range, is evaluated on the data it was trained on (pass --config "
                          "to change it) and writes into itself")
    cfg = evaluation_config(model_dir, config, overrides)
    check_flags_are_read(cfg.eval, generic)
    encoding = encoding_for_other_table(model_dir, cfg)
    setup, ddp = _join_torchrun(prepare(cfg, device, input_encoding=encoding), model_dir)
    model, card = load_trained_model(model_dir, setup.device)
    check_data_fits_model(card, setup.dataset, model_dir)
    # the report's membership audit leaves the extra data's inputs out of members and non-members
    check_data_unchanged(model_dir, setup, card, with_extra=with_report)
    if restart and (ddp is None or ddp.is_main):
        _discard_journal(model_dir / "evaluation")
    # under torchrun the ranks share the attack batches and merge per example (no journal)
    report = evaluate_model(setup, model, journal_dir=None if ddp else model_dir / "evaluation",
                            shard=ddp)
    if ddp is not None:  # as in train; rank 0's writes and further measurements follow alone
        ddp.leave()
        if not ddp.is_main:
            return
    extra = _measure_further(setup, model, report, cfg.train.objective, card) if with_report else {}
    write_json(model_dir / "robustness.json", {
        "version": RESULTS_VERSION, "kind": "evaluation", "config": cfg.model_dump(mode="json"),
        "dataset": setup.dataset.summary(), "robustness": report.to_dict(), **extra,
        **_tabular_section(setup, model),
        "provenance": provenance(cfg, setup.device)})
    shutil.rmtree(model_dir / "evaluation", ignore_errors=True)  # finished: the journal is spent
    _print_evaluation(f"{model_dir}: {setup.threat.describe()}, {report.n_examples} examples", report)
    if with_report or (model_dir / "report.html").is_file():  # an earlier page would show old numbers
        out_console.print(f"report: {write_report(load_results(model_dir), model_dir / 'report.html')}")


def _dataset_name(dataset: str | None, data_path: Path | None) -> str | None:
    """--dataset as given (an empty name too, for the registry to refuse); without it, what a .csv or
    .npz data file implies."""
    if dataset is not None:
        return dataset
    suffix = data_path.suffix.lower() if data_path is not None else ""
    return {".csv": "csv", ".npz": "npz"}.get(suffix)


def _tabular_section(setup: Setup, model: Any) -> dict[str, Any]:
    """Robust accuracy per constraint setting and feature-change counts, for tabular runs only."""
    cfg = setup.config.eval
    return tabular_section(model, setup.threat, setup.dataset.test.head(cfg.n_examples), cfg.steps,
                           cfg.batch_size, cfg.seed)


def _print_evaluation(title: str, report: Any) -> None:
    table = Table(title=title)
    table.add_column("attack")
    table.add_column("accuracy", justify="right")
    table.add_row("clean", f"{100 * report.clean_accuracy:.1f}%")
    for result in report.attacks:  # a cascade's accuracy is cumulative: marked, as on the page
        label = tables.attack_key({"name": result.name, "mode": result.mode})
        table.add_row(label, f"{100 * result.adversarial_accuracy:.1f}%")
    table.add_row("worst case", f"{100 * report.worst_case_accuracy:.1f}%")
    out_console.print(table)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")


def _evaluate_model_file(path: Path, config: Path | None, overrides: dict[str, Any], *,
                         dataset: str | None, layout: str, input_range: str | None, mean: str | None,
                         std: str | None, device: str, out: Path | None, attacks_chosen: bool,
                         generic: list[tuple[str, str]], with_report: bool, restart: bool) -> None:
    """Evaluate a Keras or ONNX file on a dataset; a model without gradients gets query attacks only."""
    from fortify.interop.card import parse_numbers
    from fortify.interop.external import check_attacks_fit_access, load_external_model
    from fortify.pipeline import attack_names

    if dataset is not None:
        overrides = {**overrides, "data": {"name": dataset}}
    cfg = load_config(config, overrides)
    if with_report and cfg.analysis.privacy and cfg.analysis.reference_models:
        raise ConfigError(LIRA_NEEDS_RECIPE)  # before any attack runs
    setup = prepare(cfg, device)
    source = {"model_file": str(path.resolve()), "sha256": ckpt.sha256(path) if path.is_file() else None,
              "dataset": cfg.data.name, "layout": layout, "input_range": input_range, "mean": mean,
              "std": std}
    if restart and out is not None:
        _discard_journal(out / "evaluation")
    out_dir = _model_file_out_dir(out, path, source)
    external = load_external_model(
        path, setup.dataset, layout=layout, input_range=parse_numbers(input_range, "--input-range", 2),
        mean=parse_numbers(mean, "--mean"), std=parse_numbers(std, "--std"), device=setup.device)
    if not external.access.white_box and not attacks_chosen:
        black_box_eval = cfg.eval.model_copy(update={"attacks": ["square"], "preset": None})
        cfg = cfg.model_copy(update={"eval": black_box_eval})
        setup = dataclasses.replace(setup, config=cfg)
    check_attacks_fit_access(attack_names(cfg.eval), external.access)
    check_flags_are_read(cfg.eval, generic)  # once the attacks are final: a black-box model's Square
    console.print(f"{path.name}: {external.access.kind}, {external.access.reason}", soft_wrap=True,
                  markup=False)
    for note in external.warnings:
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    journal_dir = out_dir / "evaluation"
    journal_dir.mkdir(parents=True, exist_ok=True)
    write_json(journal_dir / _EVALUATED_FILE, source)
    report = evaluate_model(setup, external.module, journal_dir=journal_dir)
    extra = _measure_file_model_further(setup, external, report) if with_report else {}
    write_json(out_dir / "robustness.json", {
        "version": RESULTS_VERSION, "kind": "evaluation", "config": cfg.model_dump(mode="json"),
        "dataset": setup.dataset.summary(), "model": external.describe(), "robustness": report.to_dict(),
        **extra,
        "provenance": provenance(cfg, setup.device)})
    _print_evaluation(f"{path.name} ({external.access.kind}): {setup.threat.describe()}, "
                      f"{report.n_examples} examples", report)
    shutil.rmtree(journal_dir, ignore_errors=True)  # finished: the journal is spent
    out_console.print(f"results: {out_dir / 'robustness.json'}")
    if with_report:
        out_console.print(f"report: {write_report(load_results(out_dir), out_dir / 'report.html')}")


def _discard_journal(journal_dir: Path) -> None:
    """--restart: an interrupted evaluation's journal goes; nothing else in the directory does."""
    if journal_dir.is_dir():
        shutil.rmtree(journal_dir)
        console.print(f"discarded the unfinished evaluation in {journal_dir}", markup=False)


_EVALUATED_FILE = "model_file.json"  # in the journal: which file, with which input card, it belongs to


def _model_file_out_dir(out: Path | None, path: Path, source: dict[str, Any]) -> Path:
    """A fresh --out, or one holding an unfinished evaluation of this same file and card, which the
    journal inside continues; anything else in it is left alone."""
    journal_dir = out / "evaluation" if out is not None else None
    if journal_dir is None or not (journal_dir / _EVALUATED_FILE).is_file():
        if out is not None and out.exists() and out.is_dir() and any(out.iterdir()):
            raise ConfigError(f"{out} already exists and holds no unfinished evaluation of {path.name}; "
                              "choose another --out")
        return fresh_out_dir(_out_or_default(out, f"{path.stem}-eval"), f"{path.stem}-eval", resume=False,
                             command="evaluate")
    try:
        recorded = json.loads((journal_dir / _EVALUATED_FILE).read_text())
    except (OSError, ValueError, RecursionError):  # ValueError: bad JSON, bad UTF-8, a 5,000-digit number
        recorded = None
    if recorded != source:
        raise ConfigError(f"{out} holds an unfinished evaluation of another model file or input card "
                          f"({journal_dir / _EVALUATED_FILE}); choose another --out, or pass --restart to "
                          "discard it")
    console.print(f"continuing the unfinished evaluation in {out}", markup=False)
    return out


def _measure_file_model_further(setup: Setup, external: Any, report: Any) -> dict[str, Any]:
    """``--report`` for a model file: the analysis needs gradients, so a black-box model gets the
    membership audit alone (when the analysis section asks for it)."""
    if not external.access.white_box and setup.config.analysis.enabled:
        console.print("[yellow]note:[/] no margins, certified radius or masking checks for a black-box "
                      "model (they need gradients); the report holds the attack results", soft_wrap=True)
        analysis = setup.config.analysis.model_copy(update={"enabled": False})
        config = setup.config.model_copy(update={"analysis": analysis})
        setup = dataclasses.replace(setup, config=config)
    measured = _measure_further(setup, external.module, report, None)
    if "privacy" in measured:
        measured["privacy"]["warnings"].append(_FOREIGN_MEMBERS)
    return measured


# the membership audit's members are the dataset's training split, which fortify trained on for its own
# models; of a model file it cannot know what it was trained on
_FOREIGN_MEMBERS = ("members are the dataset's training split, non-members its test split; fortify does "
                    "not know what this model file was trained on, so the audit measures leakage only "
                    "if it was trained on that split")


@app.command()
@_handles_errors
def audit(
    model_dir: Annotated[Path, typer.Argument(help="Model directory written by fortify train or run.")],
    reference_models: Annotated[int, typer.Option(min=0, max=MAX_REFERENCE_MODELS,
                                                  help="LiRA reference models (0 or 2..256).")] = 0,
    n_examples: Annotated[int | None, typer.Option(min=1, help="Members and non-members per side (at most; "
                                                          "fewer where the data hold fewer).")] = None,
    inversion: Annotated[bool, typer.Option(help="Run MI-Face model inversion on image data.")] = True,
    lira_queries: Annotated[str, typer.Option(help="Views LiRA queries each model on: single (the example "
                                              "alone) or training (also the mirror and shifts that "
                                              "train.augment trained on; images).")] = "single",
    device: DeviceOpt = "auto",
) -> None:
    """Membership inference (threshold, augmentation, LiRA) and inversion; writes privacy.json."""
    from fortify.privacy.audit import audit_trained_model

    if reference_models == 1:
        raise ConfigError("--reference-models 1 is too few: LiRA needs at least 2 reference models "
                          "(or 0 to skip it)")
    if lira_queries not in LIRA_QUERY_CHOICES:
        raise ConfigError(f"unknown --lira-queries {lira_queries!r}; valid: {', '.join(LIRA_QUERY_CHOICES)}")
    if lira_queries != "single" and reference_models == 0:
        raise ConfigError("--lira-queries applies to LiRA: give --reference-models N (N >= 2) as well")
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir} {'is not a directory' if model_dir.exists() else 'does not exist'}: "
                          "give a model directory written by fortify train or run")
    if not (model_dir / "config.yaml").is_file():
        raise ConfigError(f"{model_dir} has no config.yaml; it is not a fortify model directory")
    cfg = load_config(model_dir / "config.yaml")
    setup = prepare(cfg, device)
    model, card = load_trained_model(model_dir, setup.device)
    check_data_fits_model(card, setup.dataset, model_dir)
    # the audit leaves the extra data's inputs out of members and non-members, and LiRA's reference
    # models train on them: a changed file would score inputs the model trained on as non-members
    check_data_unchanged(model_dir, setup, card)
    report = audit_trained_model(model, audited_dataset(setup), recipe=lira_recipe(setup, card, cfg.train),
                                 n_reference_models=reference_models, n_examples=n_examples,
                                 lira_queries=lira_query_views(lira_queries, cfg.train.augment, setup),
                                 inversion=inversion, seed=cfg.train.seed, extra_data=setup.extra)
    write_json(model_dir / "privacy.json", {
        "version": RESULTS_VERSION, "kind": "privacy", "privacy": report.to_dict(),
        "provenance": provenance(cfg, setup.device)})
    table = Table(title=f"{model_dir}: membership inference")
    for column in ("attack", "AUC", "advantage"):
        table.add_column(column, justify="right")
    for result in report.membership:
        table.add_row(result.attack, f"{result.auc:.3f}", f"{result.advantage:.3f}")
    out_console.print(table)
    sizes = ", ".join(f"{m} and {n}" for m, n in sorted({(r.n_members, r.n_nonmembers)
                                                         for r in report.membership}))
    console.print(f"[yellow]note:[/] AUC 0.5 means no leakage; the advantage is taken at the best threshold "
                  f"on these same scores, so a blind attack shows some too, the more the fewer examples "
                  f"(members and non-members: {sizes})", soft_wrap=True)
    for warning in report.warnings:
        console.print(f"[yellow]note:[/] {escape(warning)}", soft_wrap=True)


LIRA_QUERY_CHOICES = ("single", "training")


# -- fortify report / compare -------------------------------------------------------------------

@app.command()
@_handles_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (results.json) or model directory "
                                                 "(robustness.json).")],
    out: Annotated[Path | None, typer.Option(help="HTML file (default RUN_DIR/report.html).")] = None,
) -> None:
    """Write the HTML report of a finished run from its results alone."""
    results = load_results(run_dir)
    path = out or Path(results["source"]).parent / "report.html"
    write_report(results, path)
    _print_comparison(results)
    out_console.print(f"report: {path}")


@app.command()
@_handles_errors
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more run or model directories.")],
    out: Annotated[Path, typer.Option(help="HTML file to write.")] = Path("comparison.html"),
) -> None:
    """Put the models of several runs side by side (same threat model required)."""
    merged = write_comparison(run_dirs, out)
    _print_comparison(merged)
    out_console.print(f"comparison: {out}")


# -- fortify export ----------------------------------------------------------------------------

@app.command()
@_handles_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="Model directory, or a fortify run directory.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="onnx, torchscript or safetensors.")] = "onnx",
    out: Annotated[Path | None, typer.Option(help="Output file (default MODEL_DIR/export/).")] = None,
    member: Annotated[str | None, typer.Option(help="In a run directory, which model: pgd (default) or "
                                                    "standard.")] = None,
) -> None:
    """Write a trained model for deployment, reload it and check its outputs match."""
    from fortify.interop.export import export_model

    result = export_model(run_dir, fmt, out, member=member)
    out_console.print(f"exported {result.format}: {result.path}\ncard: {result.card_path}\n"
                      f"reloaded and compared on {result.verified_on} random inputs: max |difference| "
                      f"{result.max_abs_difference:.2g}")


# -- fortify federate --------------------------------------------------------------------------

@app.command()
@_handles_errors
def federate(
    config: ConfigOpt = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/<dataset>-federated-*).")
                   ] = None,
    dataset: DatasetOpt = None,
    model: Annotated[str | None, typer.Option(help="Model name (default: the dataset's).")] = None,
    objective: Annotated[str | None, typer.Option(help="Local objective: standard, pgd, trades, ...")] = None,
    eps: EpsOpt = None,
    norm: NormOpt = None,
    clients: Annotated[int, typer.Option(help="Number of clients (SuperNodes).")] = 4,
    rounds: Annotated[int, typer.Option(help="Federated rounds (>= 1).")] = 5,
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 1,
    batch_size: Annotated[int | None, typer.Option(help="Local batch size.")] = None,
    lr: Annotated[float | None, typer.Option(
        help="Local learning rate (constant; default 0.05, 0.02 for free).")] = None,
    attack_steps: Annotated[int | None, typer.Option(help="PGD steps in local training.")] = None,
    partition: Annotated[str, typer.Option(help="iid or dirichlet.")] = "iid",
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration (small: skewed labels).")] = 0.5,
    partition_seed: Annotated[int, typer.Option(help="Seed of the clients' partition.")] = 0,
    strategy: Annotated[str, typer.Option(help="fedavg, fedprox, krum, trimmed-mean or median.")] = "fedavg",
    proximal_mu: Annotated[float, typer.Option(help="FedProx mu.")] = 0.01,
    trim_beta: Annotated[float, typer.Option(help="Trimmed mean: share cut at each end (< 0.5).")] = 0.25,
    malicious_clients: Annotated[int, typer.Option(help="Clients sending poisoned updates.")] = 0,
    malicious_mode: Annotated[str, typer.Option(help="flip or scale.")] = "flip",
    malicious_scale: Annotated[float, typer.Option(help="Factor on a poisoned update.")] = 10.0,
    eval_examples: Annotated[int | None, typer.Option(help="Test examples for per-round evaluation.")] = None,
    eval_steps: Annotated[int, typer.Option(help="PGD steps of the per-round robust accuracy.")] = 10,
    superlink: Annotated[str | None, typer.Option(help="Submit to a running SuperLink (HOST:PORT).")] = None,
    write_app: Annotated[Path | None, typer.Option(help="Only write the Flower app directory.")] = None,
    workers: Annotated[int | None, typer.Option(help="Simulation: clients training at once.")] = None,
    seed: SeedOpt = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")] = False,
    dp: Annotated[bool, typer.Option("--dp", help="Clients train with DP-SGD (Opacus).")] = False,
    noise_multiplier: Annotated[float | None, typer.Option(help="With --dp: DP-SGD noise.")] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help="With --dp: per-example clip norm.")] = None,
    delta: Annotated[float | None, typer.Option(help="With --dp: delta of the reported epsilon.")] = None,
    accountant: Annotated[str | None, typer.Option(help="With --dp: prv or rdp.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last "
                                                            "finished round.")] = False,
) -> None:
    """Federated (adversarial) training on Flower: simulation here, or a SuperLink deployment."""
    from fortify.federated.command import federate as run_federation
    from fortify.federated.command import print_rounds

    overrides = _overrides(data={"name": dataset, "seed": seed}, model={"name": model},
                           threat={"eps": eps, "norm": norm},
                           train={"objective": objective, "batch_size": batch_size, "lr": lr,
                                  "attack_steps": attack_steps, "seed": seed},
                           dp={"enabled": True if dp else None, "noise_multiplier": noise_multiplier,
                               "max_grad_norm": max_grad_norm, "delta": delta, "accountant": accountant})
    federation = {"clients": clients, "rounds": rounds, "local_epochs": local_epochs,
                  "partition": partition, "alpha": alpha, "partition_seed": partition_seed,
                  "strategy": strategy, "proximal_mu": proximal_mu, "trim_beta": trim_beta,
                  "malicious_clients": malicious_clients,
                  "malicious_mode": malicious_mode, "malicious_scale": malicious_scale,
                  "eval_examples": eval_examples, "eval_steps": eval_steps}
    _check_dp_flags_need_dp(dp or _file_enables_dp(config),
                            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, delta=delta,
                            accountant=accountant)
    if write_app is None:  # writing the app alone writes no run directory
        in_file = read_yaml_mapping(config).get("data")
        dataset_name = (overrides.get("data", {}).get("name")
                        or (in_file.get("name") if isinstance(in_file, dict) else None) or "digits")
        out = _out_or_default(out, f"{dataset_name}-federated", resume=resume)
    run, result = run_federation(config, overrides, federation, out=out, superlink=superlink,
                                 write_app=write_app, workers=workers, verbose=verbose, resume=resume)
    if result is None:
        out_console.print(f"Flower app: {write_app}\nrun it with: flwr run {write_app} <connection>")
        return
    print_rounds(result, out_console)
    out_console.print(f"model and per-round record: {run.federation.out}")


# -- fortify sweep -----------------------------------------------------------------------------

@app.command()
@_handles_errors
def sweep(
    config: ConfigOpt = None,
    out: Annotated[Path | None, typer.Option(help="Sweep directory, one run directory each "
                                                  "(default runs/sweep-<time>).")] = None,
    objectives: Annotated[str | None, typer.Option(help="Objectives to try, e.g. pgd,trades.")] = None,
    eps: Annotated[str | None, typer.Option(help="Training and evaluation eps values, e.g. 0.1,0.2.")] = None,
    trades_beta: Annotated[str | None, typer.Option(help="TRADES beta values (trades, awp-trades).")] = None,
    mix_ratio: Annotated[str | None, typer.Option(help="pgd-mix ratios.")] = None,
    epochs: Annotated[str | None, typer.Option(help="Epoch counts, e.g. 10,30.")] = None,
    dataset: DatasetOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Train and attack a grid of runs; rerun to resume. Writes sweep.csv, sweep.json, tradeoff.png."""
    from fortify.sweep import load_sweep, parse_grid_values, rich_table, run_sweep

    flags = {"objective": parse_grid_values(objectives, "--objectives", str),
             "eps": parse_grid_values(eps, "--eps", float),
             "trades_beta": parse_grid_values(trades_beta, "--trades-beta", float),
             "mix_ratio": parse_grid_values(mix_ratio, "--mix-ratio", float),
             "epochs": parse_grid_values(epochs, "--epochs", int)}
    base, grid = load_sweep(config, _overrides(data={"name": dataset, "seed": seed},
                                               train={"seed": seed}), flags)
    check_flags_are_read(base.eval, generic_settings_in_file(config))
    out_dir = _out_or_default(out, "sweep")
    assert out_dir is not None
    results = run_sweep(base, grid, out_dir, device=device, show_progress=not quiet,
                        log=lambda line: console.print(line, highlight=False, markup=False))
    threat = f"{base.threat.norm}, attacks: {', '.join(results[0].attack_accuracy)}"
    out_console.print(rich_table(results, f"{base.data.name} sweep ({threat})"))
    out_console.print(f"table: {out_dir / 'sweep.csv'}\nplot:  {out_dir / 'tradeoff.png'}\n"
                      f"runs:  {out_dir / 'sweep.json'}")


def main() -> None:
    warnings.formatwarning = one_line_warning
    try:
        keep_freed_memory_unless_declined()  # FORTIFY_KEEP_FREED_MEMORY=0 declines (fortify.allocator)
        read_onednn_linear_setting()  # FORTIFY_ONEDNN_LINEAR (fortify.models.onednn_linear)
    except ConfigError as err:
        _print_error(str(err))
        sys.exit(2)
    try:
        code = app(prog_name="fortify", standalone_mode=False)
    except click.UsageError as err:  # a flag click cannot parse: one line, as every other error
        where = f"; see `{err.ctx.command_path} --help`" if err.ctx is not None else ""
        _print_error(f"{err.format_message().rstrip('.')}{where}")
        sys.exit(2)
    except click.ClickException as err:
        _print_error(err.format_message())
        sys.exit(err.exit_code)
    except click.Abort:  # Ctrl-C while click itself was still working (a prompt, parsing)
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    sys.exit(main())
