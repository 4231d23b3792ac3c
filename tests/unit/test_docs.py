"""The documentation in docs/ and README.md: generated pages up to date, every reason code
and metric documented, every relative link resolving, every example checked.

The helpers at the top (Markdown code blocks, their `<!-- check: ... -->` markers, GitHub
anchors) are shared with tests/integration/test_docs_apply.py, which applies the YAML
manifests on the real apiserver and renders the Helm values with the real helm.

Markers, on the line before a ```yaml block:
- `<!-- check: helm-values -->`: values for charts/mailwarden (`helm template -f`);
- `<!-- check: import-output -->`: the exact output of `mailwarden import` for the page's
  ```ini block (and, having apiVersion/kind, a manifest too);
- `<!-- check: fragment -->`: a piece of a manifest, not checked.
Any other ```yaml block of a guide must be a manifest: every document has apiVersion and
kind. Every ```ini block must load as an emailproxy file.
"""

from __future__ import annotations

import io
import re
import shutil
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailwarden_operator import cli, docgen
from mailwarden_operator.metrics import OperatorMetrics
from mailwarden_operator.spec import parse_spec
from mailwarden_proxy import catalogue
from mailwarden_proxy.config import emailproxy
from mailwarden_proxy.metrics import ProxyMetrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
# Pages owned by others or generated: their yaml blocks are not all manifests.
NOT_GUIDES = {"configuration.md", "operator-internals.md"} | {
    p.name for p in (docgen.TROUBLESHOOTING, docgen.METRICS, docgen.CRD_REFERENCE)
}
MARKERS = {"helm-values", "import-output", "fragment"}

_FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)[^\n]*$")
_MARKER = re.compile(r"^<!--\s*check:\s*([\w-]+)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def documents(self) -> list[Any]:
        return [d for d in yaml.safe_load_all(self.text) if d is not None]

    def is_manifest(self) -> bool:
        if self.lang != "yaml" or self.marker in ("helm-values", "fragment"):
            return False
        docs = self.documents()
        return bool(docs) and all(
            isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs
        )


def doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the marker just before each."""
    out: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, lang, start = match.group(1), match.group(2).lower(), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        marker = None
        before = start - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        if before >= 0 and (m := _MARKER.match(lines[before].strip())):
            marker = m.group(1)
        out.append(Block(path, start + 1, lang, "\n".join(body) + "\n", marker))
        i += 1
    return out


def all_blocks() -> list[Block]:
    return [b for page in doc_pages() for b in blocks(page)]


def manifest_blocks() -> list[Block]:
    return [b for b in all_blocks() if b.is_manifest()]


def helm_value_blocks() -> list[Block]:
    return [b for b in all_blocks() if b.marker == "helm-values"]


def _prose(text: str) -> str:
    """The text without fenced code blocks (their lines blanked, so numbers stay)."""
    out, fence = [], None
    for line in text.splitlines():
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            out.append("")
        elif fence is not None:
            if line.startswith(fence):
                fence = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (before de-duplication)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: keep their text
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    text = _prose(path.read_text(encoding="utf-8"))
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE):
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    found |= {m.group(1) for m in re.finditer(r'<a\s+(?:id|name)="([^"]+)"', text)}
    return found


# -- generated pages ------------------------------------------------------------------


def test_generated_pages_are_up_to_date() -> None:
    stale = docgen.stale(ROOT)
    assert stale == [], (
        f"{', '.join(map(str, stale))} out of date: run `python -m mailwarden_operator.docgen` "
        "and commit the result"
    )


def test_docgen_check_reports_and_rewrites_stale_pages(tmp_path: Path) -> None:
    (tmp_path / docgen.CRD_PATH).parent.mkdir(parents=True)
    shutil.copy(ROOT / docgen.CRD_PATH, tmp_path / docgen.CRD_PATH)
    err = io.StringIO()
    with redirect_stderr(err):
        assert docgen.main(["--check", "--root", str(tmp_path)]) == 1
    assert "docs/metrics.md is out of date: run `python -m mailwarden_operator.docgen`" in (
        err.getvalue()
    )
    with redirect_stdout(io.StringIO()):
        assert docgen.main(["--root", str(tmp_path)]) == 0
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 0
    page = tmp_path / docgen.METRICS
    page.write_text(page.read_text() + "edited by hand\n")
    with redirect_stderr(io.StringIO()):
        assert docgen.main(["--check", "--root", str(tmp_path)]) == 1


def test_every_reason_code_has_its_section() -> None:
    text = (ROOT / docgen.TROUBLESHOOTING).read_text()
    headings = anchors(ROOT / docgen.TROUBLESHOOTING)
    for entry in catalogue.ENTRIES:
        assert f"\n### {entry.reason}\n" in text, entry.reason
        assert entry.reason.lower() in headings, entry.reason
        assert f'<a id="{entry.reason}"></a>' in text, entry.reason


def test_troubleshooting_renders_an_entry_completely() -> None:
    entry = catalogue.Entry(
        reason="ExampleReason",
        provider="microsoft",
        stage=catalogue.Stage.SMTP,
        cause="The mailbox | is missing.",
        fix="Run Set-CASMailbox -Identity <mailbox> (*not* the_tenant).",
        temporary=False,
        matches=("535 5.7.139", "a `quoted` text"),
    )
    section = docgen._entry_section(entry)
    assert '<a id="ExampleReason"></a>' in section
    assert "### ExampleReason" in section
    # shown as written: no HTML tag GitHub would drop, no emphasis
    fix = r"**Fix.** Run Set-CASMailbox -Identity \<mailbox\> (\*not\* the\_tenant)."
    assert fix in section
    assert "**Cause.** The mailbox | is missing." in section
    assert "- ``a `quoted` text``" in section
    assert "needs the fix below" in section


def _exposed_names(registry: Any) -> set[str]:
    return {
        f"{family.name}_total" if family.type == "counter" else family.name
        for family in registry.collect()
    }


def test_every_registered_metric_is_documented() -> None:
    text = (ROOT / docgen.METRICS).read_text()
    names = _exposed_names(ProxyMetrics().registry) | _exposed_names(OperatorMetrics().registry)
    assert len(names) >= 14
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert missing == [], "run `python -m mailwarden_operator.docgen`"


def test_crd_reference_lists_every_field_and_rule() -> None:
    text = (ROOT / docgen.CRD_REFERENCE).read_text()
    crd = yaml.safe_load((ROOT / docgen.CRD_PATH).read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node, _ in docgen._walk(schema["properties"]["spec"], "spec", True):
        if path != "spec":
            assert f"`{path}`" in text, path
        for rule in node.get("x-kubernetes-validations", ()):
            assert rule["message"] in text
    for column in crd["spec"]["versions"][0]["additionalPrinterColumns"]:
        assert f"| {column['name']} |" in text


# -- links --------------------------------------------------------------------------------

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _links(path: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", _prose(path.read_text(encoding="utf-8")))
    return [m.group(1) for m in _LINK.finditer(text)]


@pytest.mark.parametrize(
    "page", [*doc_pages(), ROOT / "README.md"], ids=lambda p: str(p.relative_to(ROOT))
)
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if not resolved.exists():
            broken.append(f"{target}: {resolved} does not exist")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading with the anchor #{fragment}")
    assert broken == []


def test_the_link_checker_sees_anchors_and_links() -> None:
    assert github_slug("2b. A client secret (or a certificate)") == (
        "2b-a-client-secret-or-a-certificate"
    )
    assert github_slug("Sidecar injection (contract)") == "sidecar-injection-contract"
    assert github_slug("`mailwarden test`: log in") == "mailwarden-test-log-in"
    links = _links(DOCS / "migrating-from-emailproxy.md")
    assert "quickstart.md#1-install-the-operator" in links
    assert not any("devicecode" in link for link in links)  # code blocks are skipped
    assert "5-read-the-status" in anchors(DOCS / "quickstart.md")


# -- examples -----------------------------------------------------------------------------


def test_guides_exist_and_are_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in (
        "quickstart.md",
        "microsoft-365.md",
        "google-workspace.md",
        "migrating-from-emailproxy.md",
        "troubleshooting.md",
        "metrics.md",
        "crd-reference.md",
    ):
        assert (DOCS / name).exists(), name
        assert f"(docs/{name})" in readme, name


def test_every_yaml_block_of_a_guide_is_checked() -> None:
    unchecked = [
        b.where
        for b in all_blocks()
        if b.lang == "yaml"
        and b.path.name not in NOT_GUIDES
        and not b.is_manifest()
        and b.marker not in MARKERS
    ]
    assert unchecked == [], "mark them (see this module's docstring) or make them manifests"
    assert {b.marker for b in all_blocks()} <= MARKERS | {None}
    assert len(manifest_blocks()) >= 9
    assert len(helm_value_blocks()) >= 3


def test_mailaccounts_in_the_docs_are_accepted_by_the_operator() -> None:
    """The operator's own parser (presets, flow rules) on every MailAccount shown."""
    seen = 0
    for block in manifest_blocks():
        for doc in block.documents():
            if doc["kind"] == "MailAccount":
                parse_spec(doc["spec"])  # raises SpecError naming the field
                assert "namespace" not in doc["metadata"], block.where
                seen += 1
    assert seen >= 8


def test_ini_blocks_load_as_emailproxy_files() -> None:
    ini = [b for b in all_blocks() if b.lang == "ini"]
    assert len(ini) >= 2
    for block in ini:
        config = emailproxy.from_text(block.text, source=block.where)
        assert config.listeners, block.where


def test_import_output_is_what_mailwarden_import_prints(tmp_path: Path) -> None:
    outputs = [b for b in all_blocks() if b.marker == "import-output"]
    assert outputs
    for block in outputs:
        (ini,) = [b for b in blocks(block.path) if b.lang == "ini"]
        source = tmp_path / "emailproxy.config"
        source.write_text(ini.text)
        out = io.StringIO()
        with redirect_stdout(out), redirect_stderr(io.StringIO()):
            code = cli.main(["import", str(source), "--username", "vault@contoso.com"])
        assert code == 0
        assert out.getvalue() == block.text, block.where


# -- names --------------------------------------------------------------------------------


def _sources(*globs: str) -> str:
    return "\n".join(
        p.read_text(encoding="utf-8") for g in globs for p in ROOT.glob(g) if p.is_file()
    )


def _doc_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in [*doc_pages(), ROOT / "README.md"])


def test_annotations_and_settings_named_in_the_docs_exist() -> None:
    """No invented names: every `mailwarden.io/...` annotation and `MAILWARDEN_*` setting
    the docs mention is one the operator, the proxy (or the chart) really uses."""
    text = _doc_text()
    code_text = _sources(
        "operator/mailwarden_operator/**/*.py",
        "proxy/mailwarden_proxy/**/*.py",
        "charts/mailwarden/**/*",
    )
    annotations = set(re.findall(r"mailwarden\.io/[a-z0-9-]+", text))
    settings = set(re.findall(r"MAILWARDEN_[A-Z0-9_]*[A-Z0-9]", text))
    assert {"mailwarden.io/inject", "mailwarden.io/check-credentials"} <= annotations
    assert [a for a in sorted(annotations) if a not in code_text] == []
    assert [s for s in sorted(settings) if s not in code_text] == []


def test_chart_values_named_in_the_guides_exist() -> None:
    """`consent.externalBaseUrl`, `operator.refreshInterval`, ... are keys of values.yaml."""
    values = yaml.safe_load((ROOT / "charts/mailwarden/values.yaml").read_text())
    named = set()
    for page in doc_pages():
        if page.name in NOT_GUIDES:
            continue
        named |= set(re.findall(r"`((?:consent|operator|webhook|ingress)\.[a-zA-Z.]+)`",
                                page.read_text()))  # fmt: skip
    assert "consent.externalBaseUrl" in named
    for dotted in sorted(named):
        node: Any = values
        for key in dotted.split("."):
            assert isinstance(node, dict) and key in node, f"{dotted} is not a chart value"
            node = node[key]


def test_guides_have_no_stray_html_tags() -> None:
    """`<your tenant>` in prose is an HTML tag to GitHub, which drops it: write such
    placeholders in code spans or without angle brackets."""
    stray = []
    for page in doc_pages():
        text = re.sub(r"`[^`\n]*`", "", _prose(page.read_text(encoding="utf-8")))
        for number, line in enumerate(text.splitlines(), 1):
            for match in re.finditer(r"(?<!\\)<(?!a id=|/a>|!--)[A-Za-z/][^>]*>", line):
                stray.append(f"{page.name}:{number}: {match.group(0)}")
    assert stray == []
