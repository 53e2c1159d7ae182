"""The ``fortify`` command line: run, train and evaluate.

Each command resolves a RunConfig from an optional YAML file plus flags (flags win), validates
everything before writing, and prints FortifyErrors as one line without a traceback.
"""

from __future__ import annotations

import functools
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from fortify.config import load_config
from fortify.errors import ConfigError, FortifyError
from fortify.pipeline import (
    Setup,
    evaluate_model,
    load_trained_model,
    prepare,
    provenance,
    train_model,
    write_json,
)
from fortify.report.html import write_report

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Harden PyTorch classifiers with adversarial training and measure it.")
console = Console(stderr=True)
out_console = Console()
RESULTS_VERSION = 1
F = TypeVar("F", bound=Callable[..., Any])

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML run configuration.")]
DatasetOpt = Annotated[str | None, typer.Option(help="Dataset name (see the registry).")]
EpsOpt = Annotated[float | None, typer.Option(help="Perturbation budget eps (> 0).")]
NormOpt = Annotated[str | None, typer.Option(help="Threat-model norm: linf or l2.")]
EpochsOpt = Annotated[int | None, typer.Option(help="Training epochs (>= 1).")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed for data split, init and attacks.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")]


def _handles_errors(command: F) -> F:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FortifyError as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: rerun the same command with --resume to continue")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _overrides(**sections: dict[str, Any]) -> dict[str, Any]:
    """Nested overrides from flags that were given (None means 'not given')."""
    return {section: {k: v for k, v in values.items() if v is not None}
            for section, values in sections.items()
            if any(v is not None for v in values.values())}


def _fresh_out_dir(out: Path | None, default_stem: str, resume: bool) -> Path:
    if out is None:
        if resume:
            raise ConfigError("--resume needs --out naming the run directory to continue")
        return Path("runs") / f"{default_stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()) and not resume:
        raise ConfigError(f"{out} already exists and is not empty; pass --resume to continue the "
                          "run in it or choose another --out")
    if resume and not out.is_dir():
        raise ConfigError(f"cannot resume: {out} does not exist")
    return out


# -- fortify run -------------------------------------------------------------------------------

@app.command()
@_handles_errors
def run(
    config: ConfigOpt = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/<dataset>-<time>).")] = None,
    dataset: DatasetOpt = None,
    eps: EpsOpt = None,
    norm: NormOpt = None,
    epochs: EpochsOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a standard and a PGD-trained model, attack both, write results and a report."""
    cfg = load_config(config, _overrides(data={"name": dataset, "seed": seed},
                                         threat={"eps": eps, "norm": norm},
                                         train={"epochs": epochs, "seed": seed}))
    setup = prepare(cfg, device, objectives=("standard", "pgd"))
    out_dir = _fresh_out_dir(out, cfg.data.name, resume)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(cfg.to_yaml())
    started = time.perf_counter()
    models = {}
    for objective in ("standard", "pgd"):
        console.print(f"training [bold]{objective}[/] model on {cfg.data.name}")
        model, training = train_model(setup, objective, out_dir / "models" / objective,
                                      resume=resume, show_progress=not quiet)
        console.print(f"attacking [bold]{objective}[/] model")
        models[objective] = {"training": training.to_dict(),
                             "robustness": evaluate_model(setup, model).to_dict()}
    results = _results(setup, models, time.perf_counter() - started)
    write_json(out_dir / "results.json", results)
    write_report(results, out_dir / "report.html")
    _print_comparison(results)
    out_console.print(f"results: {out_dir / 'results.json'}\nreport:  {out_dir / 'report.html'}")


def _results(setup: Setup, models: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {"version": RESULTS_VERSION, "kind": "comparison",
            "config": setup.config.model_dump(mode="json"), "dataset": setup.dataset.summary(),
            "threat": {"norm": setup.threat.norm, "eps": setup.threat.eps,
                       "bounds": list(setup.threat.bounds)},
            "models": models, "seconds": seconds,
            "provenance": provenance(setup.config, setup.device)}


def _print_comparison(results: dict[str, Any]) -> None:
    threat = results["threat"]
    table = Table(title=f"{results['dataset']['name']}: {threat['norm']} eps={threat['eps']:.4g}")
    first = next(iter(results["models"].values()))["robustness"]
    for column in ["model", "clean", *[a["name"] for a in first["attacks"]], "worst case"]:
        table.add_column(column, justify="right")
    for name, model in results["models"].items():
        rob = model["robustness"]
        cells = [rob["clean_accuracy"], *[a["adversarial_accuracy"] for a in rob["attacks"]],
                 rob["worst_case_accuracy"]]
        table.add_row(name, *[f"{100 * c:.1f}%" for c in cells])
    out_console.print(table)


# -- fortify train -----------------------------------------------------------------------------

@app.command()
@_handles_errors
def train(
    config: ConfigOpt = None,
    out: Annotated[Path | None, typer.Option(help="Model directory (default runs/<dataset>-<time>).")] = None,
    dataset: DatasetOpt = None,
    data_path: Annotated[Path | None, typer.Option(help="Data file for the npz dataset.")] = None,
    model: Annotated[str | None, typer.Option(help="Model name (default: the dataset's).")] = None,
    objective: Annotated[str | None, typer.Option(help="standard, fgsm, fgsm-rs or pgd.")] = None,
    eps: EpsOpt = None,
    norm: NormOpt = None,
    epochs: EpochsOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (>= 1).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (> 0).")] = None,
    attack_steps: Annotated[int | None, typer.Option(help="PGD steps during training.")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train one model (any objective) into a model directory."""
    cfg = load_config(config, _overrides(
        data={"name": dataset, "path": data_path, "seed": seed},
        model={"name": model}, threat={"eps": eps, "norm": norm},
        train={"objective": objective, "epochs": epochs, "batch_size": batch_size, "lr": lr,
               "attack_steps": attack_steps, "seed": seed}))
    setup = prepare(cfg, device)
    out_dir = _fresh_out_dir(out, f"{cfg.data.name}-{cfg.train.objective}", resume)
    _, result = train_model(setup, cfg.train.objective, out_dir, resume=resume,
                            show_progress=not quiet)
    write_json(out_dir / "training.json", result.to_dict())
    best = result.history[result.best_epoch - 1]
    out_console.print(
        f"trained {cfg.train.objective} model: epoch {result.best_epoch} selected, val clean "
        f"{100 * best.val_clean_accuracy:.1f}%"
        + (f", val robust {100 * best.val_robust_accuracy:.1f}%"
           if best.val_robust_accuracy is not None else "")
        + f"\nmodel: {out_dir / 'model.safetensors'}")


# -- fortify evaluate --------------------------------------------------------------------------

@app.command()
@_handles_errors
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="Model directory written by fortify train.")],
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
    device: DeviceOpt = "auto",
) -> None:
    """Attack a trained model; writes robustness.json into its directory (resumable)."""
    base = config if config is not None else model_dir / "config.yaml"
    if not base.is_file():
        raise ConfigError(f"{model_dir} has no config.yaml; pass --config")
    attack_list = [a.strip() for a in attacks.split(",") if a.strip()] if attacks else None
    cfg = load_config(base, _overrides(
        threat={"eps": eps, "norm": norm},
        eval={"attacks": attack_list, "preset": preset, "steps": steps, "restarts": restarts,
              "queries": queries, "surrogate": surrogate, "cascade": cascade,
              "n_examples": n_examples}))
    setup = prepare(cfg, device)
    model, _ = load_trained_model(model_dir, setup.device)
    report = evaluate_model(setup, model, journal_dir=model_dir / "evaluation")
    write_json(model_dir / "robustness.json", {
        "version": RESULTS_VERSION, "kind": "evaluation", "config": cfg.model_dump(mode="json"),
        "robustness": report.to_dict(), "provenance": provenance(cfg, setup.device)})
    shutil.rmtree(model_dir / "evaluation", ignore_errors=True)  # finished: the journal is spent
    table = Table(title=f"{model_dir}: {setup.threat.describe()}, {report.n_examples} examples")
    table.add_column("attack")
    table.add_column("accuracy", justify="right")
    table.add_row("clean", f"{100 * report.clean_accuracy:.1f}%")
    for result in report.attacks:
        table.add_row(result.name, f"{100 * result.adversarial_accuracy:.1f}%")
    table.add_row("worst case", f"{100 * report.worst_case_accuracy:.1f}%")
    out_console.print(table)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


@app.command()
@_handles_errors
def audit(
    model_dir: Annotated[Path, typer.Argument(help="Model directory written by fortify train or run.")],
    reference_models: Annotated[int, typer.Option(min=0, help="LiRA reference models (0 or >= 2).")] = 0,
    n_examples: Annotated[int | None, typer.Option(help="Members and non-members per side.")] = None,
    inversion: Annotated[bool, typer.Option(help="Run MI-Face model inversion on image data.")] = True,
    device: DeviceOpt = "auto",
) -> None:
    """Membership inference (threshold, augmentation, LiRA) and inversion; writes privacy.json."""
    from fortify.privacy.audit import audit_trained_model
    from fortify.privacy.recipe import TrainerRecipe

    if reference_models == 1:
        raise ConfigError("--reference-models 1 is too few: LiRA needs at least 2 reference models "
                          "(or 0 to skip it)")
    cfg = load_config(model_dir / "config.yaml") if (model_dir / "config.yaml").is_file() else None
    if cfg is None:
        raise ConfigError(f"{model_dir} has no config.yaml; it is not a fortify model directory")
    setup = prepare(cfg, device)
    model, card = load_trained_model(model_dir, setup.device)
    recipe = TrainerRecipe.for_model(card["name"], card["input_shape"], card["num_classes"],
                                     config=cfg.train, threat=setup.threat, val=setup.dataset.val,
                                     mean=card["mean"], std=card["std"], device=setup.device)
    report = audit_trained_model(model, setup.dataset, recipe=recipe, n_reference_models=reference_models,
                                 n_examples=n_examples, inversion=inversion, seed=cfg.train.seed)
    write_json(model_dir / "privacy.json", {
        "version": RESULTS_VERSION, "kind": "privacy", "privacy": report.to_dict(),
        "provenance": provenance(cfg, setup.device)})
    table = Table(title=f"{model_dir}: membership inference")
    for column in ("attack", "AUC", "advantage"):
        table.add_column(column, justify="right")
    for result in report.membership:
        table.add_row(result.attack, f"{result.auc:.3f}", f"{result.advantage:.3f}")
    out_console.print(table)
    for warning in report.warnings:
        console.print(f"[yellow]note:[/] {warning}", soft_wrap=True)


def main() -> None:
    app(prog_name="fortify")


if __name__ == "__main__":
    sys.exit(main())
