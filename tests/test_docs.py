"""The docs describe the code as it is: the method docs state every method and parameter
default that the registry has; the README's layout names every module of the library."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeflow.methods import METHODS

ROOT = Path(__file__).parent.parent
DOCS = (ROOT / "docs" / "methods.md").read_text()


def section(name: str) -> str:
    start = DOCS.index(f"\n## {name}\n")
    end = DOCS.find("\n## ", start + 1)
    return DOCS[start:end]


def documented_default(default) -> str:
    if default is None:
        return "required"
    if isinstance(default, bool):
        return str(default).lower()
    return str(default)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_parameter_is_documented_with_its_default(name):
    text = section(name)
    for param in METHODS[name].params:
        scope = "per model" if param.per_model else "global"
        row = f"| `{param.name}` | {scope} | {documented_default(param.default)} |"
        assert row in text, f"docs/methods.md, section {name}: missing row starting {row}"


def test_the_readme_layout_names_every_module_of_the_library():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("Layout: `mergeflow/`") :].split("\n\n")[0]
    library = ROOT / "mergeflow"
    names = [f"`{p.name}`" for p in library.glob("*.py") if p.name != "__init__.py"]
    names += [f"`{p.parent.name}/`" for p in library.glob("*/__init__.py")]
    missing = [name for name in sorted(names) if name not in layout]
    assert not missing, f"README.md's Layout paragraph does not name {', '.join(missing)}"
