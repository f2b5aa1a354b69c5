"""MkDocs hook: the reference pages, generated from the code at every build so they cannot drift.

- ``reference/settings.md``: every field of ``worker.settings.Settings`` (env name, type, default,
  bounds, description);
- ``reference/cli.md``: every command of the ``pneumoscreen`` click group;
- ``reference/api.md`` and ``reference/openapi.json``: the HTTP API from FastAPI's OpenAPI schema;
- ``ml/model-card.md``: the shipped model's ``model/default/model_card.json``.

It also drops from the nav the pages that other parts of the product add as they land
(``OPTIONAL_PAGES``) while they are not there yet, and lists every ``site/*.md`` page.
``render_*`` are plain functions, so ``tests/test_docs.py`` checks their output directly.
"""

from __future__ import annotations

import inspect
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `mkdocs build` run from the checkout, without an editable install
    sys.path.insert(0, str(ROOT))

GENERATED = ("reference/settings.md", "reference/cli.md", "reference/api.md", "ml/model-card.md")
OPTIONAL_PAGES = ("integration/sr.md", "integration/hl7.md", "integration/fhir.md", "integration/dicomweb.md",
                  "security/audit.md", "security/shares.md")
"""Pages written with the features they describe: in the nav once they exist."""
SITE_SECTION = "Site loop"
"""The nav section that lists every ``site/*.md`` page there is."""
ENV_PREFIX = "PNEUMOSCREEN_"
_LONG_LIST = 12


def _cell(text: Any) -> str:
    """``text`` safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


# --- settings -------------------------------------------------------------------------------------------------

def _type_name(annotation: Any) -> str:
    """A reader's name for a field's type: ``int``, ``path``, ``one of: a, b``, ``secret, optional``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of: " + ", ".join(f"`{v}`" for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        name = " or ".join(_type_name(a) for a in args)
        return f"{name}, optional" if optional else name
    names = {"Path": "path", "SecretStr": "secret", "str": "text", "int": "integer", "float": "number",
             "bool": "boolean"}
    return names.get(getattr(annotation, "__name__", ""), str(annotation))


def _bounds(field: Any) -> str:
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    found = [f"{words[name]} {getattr(m, name)}" for m in field.metadata for name in words if hasattr(m, name)]
    return ", ".join(found)


def _default(field: Any) -> str:
    if field.default is None:
        return "unset"
    value = str(field.default)
    return f"`{value}`" if value else "empty"


def setting_rows() -> list[dict[str, str]]:
    """One row per setting of ``worker.settings.Settings``, in the order the model declares them."""
    from worker.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    return [{"name": name, "env": f"{prefix}{name}".upper(), "type": _type_name(field.annotation),
             "default": _default(field), "bounds": _bounds(field), "description": field.description or ""}
            for name, field in Settings.model_fields.items()]


def _group_env_options() -> list[tuple[str, str, str]]:
    """(env, option, default) of the options of the ``pneumoscreen`` group itself, read from the environment too."""
    from worker.cli import cli

    return [(p.envvar, p.opts[0], str(p.default)) for p in cli.params
            if isinstance(getattr(p, "envvar", None), str) and p.envvar.startswith(ENV_PREFIX)]


def render_settings() -> str:
    lines = [
        "# Settings reference", "",
        "Generated from `worker/settings.py` at every build of this site. Every setting is an environment",
        "variable (`PNEUMOSCREEN_` and the name in capitals); the commands that take a flag for it say so in",
        "the [command-line reference](cli.md). Every value is checked when a command starts, so a bad one",
        "stops the command before the first association, with the setting's name and what was expected.", "",
        "| variable | type | default | bounds | meaning |", "|---|---|---|---|---|",
    ]
    for row in setting_rows():
        lines.append(f"| `{row['env']}` | {_cell(row['type'])} | {_cell(row['default'])} | {_cell(row['bounds'])} "
                     f"| {_cell(row['description'])} |")
    options = _group_env_options()
    if options:
        lines += ["", "Options of the `pneumoscreen` command itself, also read from the environment:", "",
                  "| variable | option | default |", "|---|---|---|"]
        lines += [f"| `{env}` | `{opt}` | `{default}` |" for env, opt, default in options]
    lines += ["", "Logs carry UIDs and counts, never patient names, IDs or birth dates.", ""]
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------------------

def cli_commands() -> list[tuple[str, Any]]:
    """``("pneumoscreen db upgrade", command)`` for every command, groups walked, in name order."""
    import click

    from worker.cli import cli

    found: list[tuple[str, Any]] = []

    def walk(command: Any, path: str) -> None:
        if isinstance(command, click.Group):
            for name in sorted(command.commands):
                walk(command.commands[name], f"{path} {name}")
        else:
            found.append((path, command))

    walk(cli, "pneumoscreen")
    return found


def _command_section(path: str, command: Any) -> list[str]:
    import click

    if " " not in path:  # the group itself
        ctx = click.Context(command, info_name=path)
    else:
        parent = click.Context(click.Group("pneumoscreen"), info_name="pneumoscreen")
        ctx = click.Context(command, info_name=path.split(" ", 1)[1], parent=parent)
    lines = [f"## `{path}`", "", "```text", command.get_usage(ctx), "```", ""]
    if command.help:
        lines += [inspect.cleandoc(click.unstyle(command.help)), ""]
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    if arguments:
        lines += ["Arguments: " + ", ".join(f"`{a.human_readable_name}`" for a in arguments), ""]
    records = [(p, p.get_help_record(ctx)) for p in command.get_params(ctx) if isinstance(p, click.Option)]
    rows = [(p, r) for p, r in records if r is not None]
    if rows:
        lines += ["| option | meaning | environment |", "|---|---|---|"]
        for param, (names, text) in rows:
            env = param.envvar if isinstance(getattr(param, "envvar", None), str) else ""
            lines.append(f"| `{_cell(names)}` | {_cell(text)} | {f'`{env}`' if env else ''} |")
        lines.append("")
    return lines


def render_cli() -> str:
    lines = ["# Command-line reference", "",
             "Generated from the `pneumoscreen` click group (`worker/cli/`) at every build of this site.",
             "Every command reads the [settings](settings.md) from `PNEUMOSCREEN_*` environment variables;",
             "a flag, where there is one, wins over the variable. `--json` prints one document on stdout and",
             "nothing else.", ""]
    from worker.cli import cli

    lines += _command_section("pneumoscreen", cli)
    for path, command in cli_commands():
        lines += _command_section(path, command)
    return "\n".join(lines)


# --- HTTP API -------------------------------------------------------------------------------------------------

def openapi_schema() -> dict[str, Any]:
    """The OpenAPI document of ``pneumoscreen api``, built without a database or the environment."""
    from pydantic import SecretStr

    from worker.api.app import create_app
    from worker.settings import Settings

    settings = Settings.model_construct(api_token=SecretStr("reference-" * 4))  # no environment read
    return create_app(settings).openapi()


def _schema_type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return f"`{schema['$ref'].rsplit('/', 1)[-1]}`"
    if "anyOf" in schema:
        return " or ".join(_schema_type(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list of {_schema_type(schema.get('items', {}))}"
    if "enum" in schema:
        return "one of " + ", ".join(f"`{v}`" for v in schema["enum"])
    return str(schema.get("type", "any"))


def _operation_section(path: str, method: str, operation: dict[str, Any]) -> list[str]:
    lines = [f"## `{method.upper()} {path}`", ""]
    if operation.get("summary"):
        lines += [f"**{operation['summary']}**", ""]
    if operation.get("description"):
        lines += [operation["description"].strip(), ""]
    parameters = operation.get("parameters", [])
    if parameters:
        lines += ["| parameter | in | type | required | meaning |", "|---|---|---|---|---|"]
        for p in parameters:
            schema = p.get("schema", {})
            default = f" (default `{schema['default']}`)" if "default" in schema else ""
            lines.append(f"| `{p['name']}` | {p['in']} | {_cell(_schema_type(schema))} | "
                         f"{'yes' if p.get('required') else 'no'} | {_cell(p.get('description', ''))}{default} |")
        lines.append("")
    lines += ["| answer | meaning | body |", "|---|---|---|"]
    for code, response in operation.get("responses", {}).items():
        body = response.get("content", {}).get("application/json", {}).get("schema", {})
        lines.append(f"| {code} | {_cell(response.get('description', ''))} | {_cell(_schema_type(body)) if body else ''} |")
    return lines + [""]


def _schema_section(name: str, schema: dict[str, Any]) -> list[str]:
    lines = [f"### `{name}`", ""]
    if schema.get("description"):
        lines += [_cell(schema["description"]), ""]
    properties = schema.get("properties", {})
    if properties:
        required = set(schema.get("required", []))
        lines += ["| field | type | required | meaning |", "|---|---|---|---|"]
        for field, spec in properties.items():
            lines.append(f"| `{field}` | {_cell(_schema_type(spec))} | {'yes' if field in required else 'no'} | "
                         f"{_cell(spec.get('description', ''))} |")
        lines.append("")
    return lines


def render_api(schema: dict[str, Any] | None = None) -> str:
    schema = schema or openapi_schema()
    info = schema.get("info", {})
    lines = ["# HTTP API reference", "",
             f"Generated from the OpenAPI schema of `pneumoscreen api` (`worker/api/app.py`), version "
             f"{info.get('version', '')}, at every build of this site; the same document is served at",
             "`/openapi.json` by the running API and is [here](openapi.json) as a file.", "",
             info.get("description", ""), ""]
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            lines += _operation_section(path, method, operation)
    components = schema.get("components", {}).get("schemas", {})
    if components:
        lines += ["## Schemas", ""]
        for name, spec in components.items():
            lines += _schema_section(name, spec)
    return "\n".join(lines)


# --- model card -----------------------------------------------------------------------------------------------

def _summary(value: Any) -> str | None:
    """A compact cell for a ``{"mean", "sd", ...}`` statistic or a list; None for anything else."""
    if isinstance(value, dict) and {"mean", "sd"} <= value.keys():
        text = f"{value['mean']:.4g} ± {value['sd']:.2g}"
        if {"min", "max"} <= value.keys():
            text += f" (min {value['min']:.4g}, max {value['max']:.4g})"
        return text
    if isinstance(value, list):
        if len(value) > _LONG_LIST or any(isinstance(v, (dict, list)) for v in value):
            return f"{len(value)} values (in `model_card.json`)"
        return ", ".join(_number(v) for v in value) or "none"
    return None


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _flatten(value: Any, path: str) -> list[tuple[str, str]]:
    summary = _summary(value)
    if summary is not None:
        return [(path, summary)]
    if isinstance(value, dict):
        if not value:
            return [(path, "none")]
        return [row for key, item in value.items() for row in _flatten(item, f"{path}.{key}" if path else key)]
    return [(path, _number(value))]


def load_card(path: Path | None = None) -> dict[str, Any]:
    return json.loads((path or ROOT / "model" / "default" / "model_card.json").read_text())


def render_model_card(card: dict[str, Any] | None = None) -> str:
    card = card or load_card()
    population = card.get("intended_population") or {}
    lines = [f"# Model card: {card['name']} {card['version']}", "",
             "Generated from `model/default/model_card.json`, the card of the model shipped in the package,",
             "at every build of this site. [Training](training.md) says how it was made and what the figures",
             "mean; [the experiment log](experiments.md) what was tried.", "",
             "| | |", "|---|---|",
             f"| name | `{card['name']}` |", f"| version | `{card['version']}` |",
             f"| weights sha256 | `{card['sha256']}` |", f"| threshold | {card['threshold']:.6f} |",
             f"| input size | {card['input_size']} x {card['input_size']} |",
             f"| preprocessing version | `{card['preprocessing_version']}` |",
             f"| created | {card.get('created_at', '')} |", ""]
    if population:
        lines += ["## Intended population", "", _cell(population.get("description", "")), ""]
    for section in ("training_data", "intended_population", "validation", "training", "site_calibration"):
        if section not in card:
            continue
        lines += [f"## `{section}`", "", "| field | value |", "|---|---|"]
        lines += [f"| `{_cell(key)}` | {_cell(value)} |" for key, value in _flatten(card[section], "")]
        lines.append("")
    return "\n".join(lines)


# --- MkDocs events --------------------------------------------------------------------------------------------

def _prune(nav: list[Any], docs_dir: Path) -> list[Any]:
    """``nav`` without the optional pages that do not exist yet, and without sections left empty."""
    kept: list[Any] = []
    for entry in nav:
        if isinstance(entry, dict):
            (title, target), = entry.items()
            if isinstance(target, list):
                target = _prune(target, docs_dir)
                if not target:
                    continue
            elif target in OPTIONAL_PAGES and not (docs_dir / target).is_file():
                continue
            kept.append({title: target})
        elif entry in OPTIONAL_PAGES and not (docs_dir / entry).is_file():
            continue
        else:
            kept.append(entry)
    return kept


def on_config(config):
    docs_dir = Path(config["docs_dir"])
    site_pages = sorted(p.relative_to(docs_dir).as_posix() for p in (docs_dir / "site").glob("*.md"))
    nav = [{SITE_SECTION: site_pages} if isinstance(e, dict) and SITE_SECTION in e else e
           for e in config["nav"] or []]
    config["nav"] = _prune(nav, docs_dir)
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    pages = {"reference/settings.md": render_settings, "reference/cli.md": render_cli,
             "ml/model-card.md": render_model_card}
    schema = openapi_schema()
    for uri, render in pages.items():
        files.append(File.generated(config, uri, content=render()))
    files.append(File.generated(config, "reference/api.md", content=render_api(schema)))
    files.append(File.generated(config, "reference/openapi.json", content=json.dumps(schema, indent=2)))
    return files
