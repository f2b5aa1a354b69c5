"""`pneumoscreen drift`: do the films screened lately look like the model's reference? No labels needed."""

from __future__ import annotations

import json
from pathlib import Path

import click

from worker.cli.context import cli, load_settings, require_current_schema, sessions


@cli.command()
@click.option("--window", type=click.IntRange(min=30), help="the last N screened films [PNEUMOSCREEN_DRIFT_WINDOW, 500]")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="the model whose films and reference to compare [default: PNEUMOSCREEN_MODEL_DIR or the shipped model]")
@click.option("--json", "as_json", is_flag=True, help="one JSON document on stdout")
def drift(window: int | None, model_dir: Path | None, as_json: bool) -> None:
    """Compare the last N films the model screened with its reference: the flag rate, the score
    distribution (Kolmogorov-Smirnov D and p-value against the held-out scores) and the input
    statistics (frame proportions, brightness, size, modality and manufacturer mix). Says
    drifted, with the reasons, when any of them moved. Exit status 0 either way."""
    from model.artifact import DEFAULT_MODEL_DIR, ModelArtifactError, read_card
    from worker.drift import drift_report

    settings = load_settings()
    require_current_schema(settings)
    model_dir = Path(model_dir or settings.model_dir or DEFAULT_MODEL_DIR)
    try:
        card = read_card(model_dir, verify=False)
        with sessions()() as session:
            report = drift_report(session, model_dir=model_dir, card=card, window=window or settings.drift_window)
    except (ModelArtifactError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    _print(report)


def _print(report: dict) -> None:
    click.echo(f"model {report['model_version']}: {report['window']} films screened in the window "
               f"({report['inputs_window']} with input statistics)")
    if "note" in report:
        click.echo(report["note"])
        return
    fr = report["flag_rate"]
    click.echo(f"  flag rate        {fr['window']:.3f}  reference {fr['reference']:.3f}  p {fr['p_value']:.2e}")
    for name, figures in (("scores", report["scores"]), *report["inputs"].items()):
        if "statistic" in figures:
            click.echo(f"  {name:<16} median {figures['window_median']:<8g} reference {figures['reference_median']:<8g} "
                       f"KS D {figures['statistic']:.3f}  p {figures['p_value']:.2e}")
        else:
            shares = ", ".join(f"{k} {v:.0%}" for k, v in figures["window"].items())
            click.echo(f"  {name:<16} {shares}" + (f"  ({figures['note']})" if "note" in figures else ""))
    click.echo("DRIFTED: " + "; ".join(report["reasons"]) if report["drifted"] else "no drift")
