"""The documentation of a fresh clone: README / docs links resolve, every "THEORY Sn" citation has its
section in docs/theory.md, the functions docs/theory.md names exist, the TOML shown in docs/scale_out.md
parses, and the pdoc API reference builds without warnings (the `docs` extra)."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
THEORY = ROOT / "docs" / "theory.md"
STATEMENTS = range(1, 14)

FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
ANCHOR = re.compile(r"<a\s+id=\"([^\"]+)\"")
CITATION = re.compile(r"THEORY S(\d+)")
PDOC_MODULES = ("dfm", "proofs_check")  # dfm.__all__ lists its subpackages (hf, io, ...) itself


def _prose(text: str) -> str:
    """The page without its fenced code blocks (code may contain `a[i](x)`)."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    ids = set(ANCHOR.findall(text))
    ids |= {_slug(h) for h in re.findall(r"^#+\s+(.*)$", _prose(text), re.MULTILINE)}
    return ids


def _links(page: Path) -> list[str]:
    return LINK.findall(_prose(page.read_text(encoding="utf-8")))


def test_readme_starts_with_the_two_setup_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = FENCE.search(text).group(0)
    assert "bash scripts/dev.sh run" in first_block and "bash scripts/dev.sh test" in first_block
    assert text.index(first_block) < text.index("\n## "), "the set-up commands must come before any section"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if "shared" in Path(path).parts or not dest.is_relative_to(ROOT):
            bad.append(f"{target}: points outside the repository")
        elif not dest.exists():
            bad.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            bad.append(f"{target}: no anchor #{fragment} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(bad)


def test_no_page_points_at_the_external_spec():
    for page in PAGES:
        assert "shared/THEORY" not in page.read_text(encoding="utf-8"), page


def test_theory_has_a_section_per_statement():
    text = THEORY.read_text(encoding="utf-8")
    anchors = _anchors(THEORY)
    for n in STATEMENTS:
        assert f"s{n}" in anchors, f"docs/theory.md: no <a id=\"s{n}\"> anchor"
        assert re.search(rf"^## S{n} — ", text, re.MULTILINE), f"docs/theory.md: no '## S{n} — ...' heading"


def test_every_theory_citation_resolves():
    """Every "THEORY Sn" in the code (docstrings, comments) and in the docs has a section in docs/theory.md."""
    anchors = _anchors(THEORY)
    files = [p for d in ("dfm", "experiments", "proofs_check") for p in (ROOT / d).rglob("*.py")] + PAGES
    cited: dict[int, str] = {}
    for path in files:
        for n in CITATION.findall(path.read_text(encoding="utf-8")):
            cited.setdefault(int(n), str(path.relative_to(ROOT)))
    assert cited, "no THEORY citations found"
    missing = {f"S{n}": where for n, where in cited.items() if f"s{n}" not in anchors}
    assert not missing, f"cited but without a section in docs/theory.md: {missing}"


def _defined_names(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    return set(re.findall(r"^\s*(?:async\s+)?(?:def|class)\s+(\w+)", text, re.MULTILINE))


def test_theory_names_exist_in_the_linked_files():
    """In each "In the code:" / "Checked by:" paragraph of docs/theory.md, the backticked names after a link
    to a Python file are defined (def / class) in that file: the identifiers right after the link, for
    "Checked by" only the first one (the rest of that paragraph names library functions in prose)."""
    text = THEORY.read_text(encoding="utf-8").rstrip() + "\n\n"
    paragraphs = re.findall(r"^\*\*(In the code|Checked by):\*\*(.*?)(?=\n\n)", text, re.DOTALL | re.MULTILINE)
    assert len(paragraphs) >= 2 * len(STATEMENTS)
    bad, checked = [], 0
    for kind, body in paragraphs:
        pieces = re.split(r"\[[^\]]*\]\(([^)]+)\)", body)  # [prose, target, after, target, after, ...]
        for target, after in zip(pieces[1::2], pieces[2::2]):
            if not target.endswith(".py"):
                continue
            path = (THEORY.parent / target).resolve()
            if not path.exists():
                bad.append(f"{target}: no such file")
                continue
            names = re.findall(r"`([A-Za-z_][\w.]*)`", after)
            if kind == "Checked by":
                names = re.findall(r"^\s*`([A-Za-z_]\w*)`", after)[:1]
            defined = _defined_names(path)
            for name in names:
                checked += 1
                for part in name.split("."):
                    if part not in defined:
                        bad.append(f"{target}: `{name}` ({part} not defined there)")
    assert checked > 50
    assert not bad, "docs/theory.md names code that does not exist:\n" + "\n".join(bad)


def test_scale_out_toml_is_accepted_by_the_config_parser():
    from experiments.text.config import ExperimentConfig

    text = (ROOT / "docs" / "scale_out.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```toml\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    assert blocks, "docs/scale_out.md shows no [mesh] TOML"
    for block in blocks:
        raw = tomllib.loads(block)
        config = ExperimentConfig.from_dict(raw)
        for section, values in raw.items():
            for key, value in values.items():
                assert getattr(getattr(config, section), key) == value, f"{section}.{key}"
    assert "to be wired" not in text


def test_readme_quickstart_is_one_python_block():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, "## Quickstart must hold exactly one python block"
    compile(blocks[0], "README.md#quickstart", "exec")
    assert len(blocks[0].strip().splitlines()) <= 10


@pytest.mark.skipif(importlib.util.find_spec("pdoc") is None, reason="pdoc not installed (the `docs` extra)")
def test_api_reference_builds_without_warnings(tmp_path):
    """The API reference from the docstrings, as the README builds it. pdoc reports problems (an annotation
    it cannot resolve, a module that does not import) as warnings on stderr ("Warn: ..."): any is an error."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="default")
    proc = subprocess.run([sys.executable, "-m", "pdoc", *PDOC_MODULES, "-o", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("Warn") or "Warning:" in line]
    assert not warnings, "pdoc warnings:\n" + "\n".join(warnings)
    for page in ("index.html", "dfm.html", "dfm/decentral.html", "dfm/velocities.html", "dfm/hf.html",
                 "proofs_check.html"):
        assert (tmp_path / page).is_file(), page
