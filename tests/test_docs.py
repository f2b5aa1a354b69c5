"""The documentation: the site builds strictly and loads nothing from another host, its reference
pages are generated from the code and name everything there is, and the README stays a front page."""

from __future__ import annotations

import importlib.util
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
CODE_FOLDERS = ("worker", "dicom_io", "model", "db")
SETUP_COMMANDS = (
    "sudo apt-get install -y python3-venv make && make run",
    "sudo apt-get install -y python3-venv make dcmtk dicom3tools orthanc orthanc-dicomweb openssl redis-server postgresql chromium "
    "chromium-driver && make test",
)
_LOADING_TAGS = {"script", "link", "img", "source", "iframe", "audio", "video", "embed", "object"}
_EXTERNAL = re.compile(r"^\s*(https?:)?//", re.IGNORECASE)


def _hook():
    spec = importlib.util.spec_from_file_location("docs_reference_hook", DOCS / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _hook()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built as `make docs` builds it (strict: any warning fails the build)."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    site_dir = tmp_path_factory.mktemp("site")
    config = load_config(config_file=str(ROOT / "mkdocs.yml"), site_dir=str(site_dir), strict=True)
    build(config)
    return site_dir


class _ExternalLoads(HTMLParser):
    """Every URL on another host that a tag loads (script, stylesheet, image, font, frame...)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _LOADING_TAGS:
            return
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data") and value and _EXTERNAL.match(value):
                self.found.append(f"<{tag} {name}={value}>")


def test_site_builds_strictly_with_every_page_of_the_nav(site):
    for page in ("index.html", "conformance/dicom.html", "conformance/ihe.html", "reference/settings.html",
                 "reference/cli.html", "reference/api.html", "reference/openapi.json", "ml/model-card.html",
                 "developers/where-things-are.html", "operators/runbook.html"):
        assert (site / page).is_file(), page


def test_no_page_loads_anything_from_another_host(site):
    pages = list(site.rglob("*.html"))
    assert len(pages) > 20
    found = []
    for page in pages:
        parser = _ExternalLoads()
        parser.feed(page.read_text(encoding="utf-8"))
        found += [f"{page.relative_to(site)}: {item}" for item in parser.found]
    for sheet in site.rglob("*.css"):
        text = sheet.read_text(encoding="utf-8", errors="replace")
        found += [f"{sheet.relative_to(site)}: {m}" for m in re.findall(r"(?:url\(|@import)\s*['\"]?(?:https?:)?//[^)'\"]+",
                                                                        text)]
    assert not found, "\n".join(found)


def test_external_loads_are_detected():
    parser = _ExternalLoads()
    parser.feed('<link href="https://fonts.example/css"><img src="//cdn.example/x.png"><a href="https://x.example">'
                '<script src="assets/local.js"></script>')
    assert parser.found == ["<link href=https://fonts.example/css>", "<img src=//cdn.example/x.png>"]


def test_every_setting_has_a_description():
    missing = [row["env"] for row in reference.setting_rows() if not row["description"].strip()]
    assert not missing, f"settings without a description in worker/settings.py: {', '.join(missing)}"


def test_settings_reference_names_every_setting_with_its_default(site):
    from worker.settings import Settings

    page = (site / "reference" / "settings.html").read_text(encoding="utf-8")
    rows = reference.setting_rows()
    assert len(rows) == len(Settings.model_fields)
    for row in rows:
        assert row["env"] == f"PNEUMOSCREEN_{row['name'].upper()}"
        assert row["env"] in page
    assert "<code>11112</code>" in page and "PNEUMOSCREEN_LOG_LEVEL" in page


def test_cli_reference_names_every_command(site):
    page = (site / "reference" / "cli.html").read_text(encoding="utf-8")
    commands = [path for path, _ in reference.cli_commands()]
    for expected in ("pneumoscreen run", "pneumoscreen listen", "pneumoscreen db upgrade", "pneumoscreen worklist",
                     "pneumoscreen rescreen", "pneumoscreen api"):
        assert expected in commands
    for path in commands:
        assert f"<code>{path}</code>" in page, path
    assert "--from-pacs" in page and "PNEUMOSCREEN_LOG_LEVEL" in page


def test_api_reference_names_every_path_of_the_openapi_schema(site):
    import json

    schema = json.loads((site / "reference" / "openapi.json").read_text(encoding="utf-8"))
    page = (site / "reference" / "api.html").read_text(encoding="utf-8")
    assert "/worklist" in schema["paths"] and "/healthz" in schema["paths"]
    for path, operations in schema["paths"].items():
        for method in operations:
            assert f"<code>{method.upper()} {path}</code>" in page, (method, path)


def test_model_card_page_shows_the_shipped_card(site):
    card = reference.load_card()
    page = (site / "ml" / "model-card.html").read_text(encoding="utf-8")
    assert card["version"] in page and card["sha256"] in page and f"{card['threshold']:.6f}" in page
    assert card["training_data"]["manifest_sha256"] in page


def test_model_card_page_compacts_statistics_and_long_curves():
    text = reference.render_model_card({
        "name": "m", "version": "9.9.9", "sha256": "ab" * 32, "threshold": 0.5, "input_size": 160,
        "preprocessing_version": "2",
        "validation": {"auc": {"mean": 0.99, "sd": 0.001, "min": 0.98, "max": 0.995, "values": [0.98, 0.995]},
                       "curve": list(range(100))},
    })
    assert "| `auc` | 0.99 ± 0.001 (min 0.98, max 0.995) |" in text
    assert "| `curve` | 100 values (in `model_card.json`) |" in text


def test_where_things_are_names_every_python_file_of_the_code_folders():
    page = (DOCS / "developers" / "where-things-are.md").read_text(encoding="utf-8")
    lines = page.splitlines()
    missing = []
    for folder in CODE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            parent = path.parent.relative_to(ROOT).as_posix() + "/"
            named = relative in page or any(parent in line and f"`{path.name}`" in line for line in lines)
            if not named:
                missing.append(relative)
    assert not missing, f"docs/developers/where-things-are.md does not name: {', '.join(missing)}"


def test_nav_keeps_optional_pages_only_once_they_exist(tmp_path):
    (tmp_path / "integration").mkdir()
    (tmp_path / "integration" / "hl7.md").write_text("# HL7\n")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "drift.md").write_text("# Drift\n")
    config = {"docs_dir": str(tmp_path), "nav": [
        {"Home": "index.md"},
        {"Integration": [{"HL7": "integration/hl7.md"}, {"FHIR": "integration/fhir.md"}]},
        {"Security": [{"Audit": "security/audit.md"}]},
        {reference.SITE_SECTION: []},
    ]}
    nav = reference.on_config(config)["nav"]
    assert nav == [{"Home": "index.md"}, {"Integration": [{"HL7": "integration/hl7.md"}]},
                   {reference.SITE_SECTION: ["site/drift.md"]}]


def test_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    for command in SETUP_COMMANDS:
        assert command in text, f"README lacks the set-up command {command!r}"
        assert command in (DOCS / "operators" / "install.md").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "Kermany" in text and "CC BY 4.0" in text
    for image in ("worklist.png", "study.png", "operations.png"):
        assert f"docs/{image}" in text


def test_readme_links_point_at_files_that_exist():
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not _EXTERNAL.match(link) and not link.startswith("mailto:")]
    assert any(link.startswith("docs/") for link in local)
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
