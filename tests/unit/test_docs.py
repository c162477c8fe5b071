"""The docs that are read off the source stay in step with it: docs/configuration.md (every config
key, its default and description) and docs/troubleshooting.md (every error Grove raises, with a
written cause and fix). `scripts/gen_docs.py --check` is the check; the other tests here check
the checker, and that the pages' links resolve."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
gen_docs = importlib.util.module_from_spec(_spec)
sys.modules["gen_docs"] = gen_docs  # its dataclasses look their module up
_spec.loader.exec_module(gen_docs)


def test_configuration_and_troubleshooting_pages_are_up_to_date():
    out = subprocess.run([sys.executable, "scripts/gen_docs.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, (
        "docs are out of step with the source; run `python scripts/gen_docs.py --write`, write the cause "
        "and fix of any entry marked TODO in docs/troubleshooting.md, and describe any key it names:\n"
        + out.stderr[-6000:])


# -- the troubleshooting check --------------------------------------------------------------

SOURCE = '''
def f(x):
    if x:
        raise ValueError(f"task.thing={x!r} must be set: " "fix it")
    raise RuntimeError("plain " + str(x))


class C:
    def g(self):
        usage_error("error", f"bad {self.y}")
        raise KeyError(x)  # no message: not a site
'''


def test_error_sites_are_found_with_their_message_templates():
    finder = gen_docs._SiteFinder("m.py", SOURCE)
    finder.visit(ast.parse(SOURCE))
    assert [(s.function, s.exception, s.message) for s in finder.sites] == [
        ("f", "ValueError", "task.thing={x} must be set: fix it"),
        ("f", "RuntimeError", "plain {...}"),
        ("C.g", "usage_error", "bad {self.y}"),
    ]


def test_site_ids_are_module_function_exception_and_first_words():
    ids = {s.id for s in gen_docs.find_sites()}
    assert "trainer.config:GroveConfig.__post_init__:ValueError:buffer.max_staleness must be >= 0, got" in ids
    assert len(ids) == len(gen_docs.find_sites())  # unique


def test_a_new_error_site_without_an_entry_fails_the_check(monkeypatch):
    site = gen_docs.Site("trainer/x.py", 1, "f", "ValueError", "something new broke", "trainer",
                         "trainer.x:f:ValueError:something new broke")
    found = gen_docs.find_sites()
    monkeypatch.setattr(gen_docs, "find_sites", lambda: [*found, site])
    text, problems = gen_docs.render_troubleshooting(gen_docs.TROUBLE_DOC.read_text())
    assert any("something new broke" in p and "no cause/fix" in p for p in problems)
    assert "<!-- id: trainer.x:f:ValueError:something new broke -->" in text and "**Cause.** TODO" in text


def test_an_entry_whose_error_site_is_gone_fails_the_check():
    existing = gen_docs.TROUBLE_DOC.read_text() + (
        "\n<!-- id: trainer.gone:f:ValueError:an old message -->\n#### an old message\n\n"
        "**Cause.** it was.\n\n**Fix.** it is gone.\n")
    text, problems = gen_docs.render_troubleshooting(existing)
    assert any("trainer.gone:f:ValueError:an old message" in p and "gone" in p for p in problems)
    assert "trainer.gone" not in text


def test_rewriting_keeps_every_written_cause_and_fix():
    current = gen_docs.TROUBLE_DOC.read_text()
    entries = gen_docs.parse_entries(current)
    assert len(entries) == len(gen_docs.find_sites())
    assert all(e.cause != gen_docs.TODO and e.fix != gen_docs.TODO for e in entries.values())
    text, _ = gen_docs.render_troubleshooting(current)
    assert gen_docs.parse_entries(text) == entries


# -- the configuration reference ------------------------------------------------------------


@dataclass
class _Sample:
    a: int = 1  # a trailing comment
    # the comment lines
    # right above
    b: str = "x"
    c: float = 0.0


def test_field_descriptions_are_the_trailing_or_preceding_comments():
    assert gen_docs.field_comments(_Sample) == {"a": "a trailing comment", "b": "the comment lines right above"}


def test_a_config_key_without_a_description_fails_the_check(monkeypatch):
    monkeypatch.delitem(gen_docs.KEY_NOTES, "trainer.lr")
    _, problems = gen_docs.collect_keys()
    assert any(p.startswith("trainer.lr: no description") for p in problems)


def _keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_every_config_key_and_group_option_is_in_the_reference():
    from trainer.config import GroveConfig

    text = gen_docs.CONFIG_DOC.read_text()
    missing = [key for key in _keys(GroveConfig) if f"| `{key}` |" not in text]
    assert not missing
    for path in sorted(gen_docs.CONFIG_DIR.glob("*/*.yaml")):
        assert f"`{path.stem}`" in text.split(f"### `{path.parent.name}=`")[1].split("###")[0], path


# -- links ----------------------------------------------------------------------------------

PAGES = ["quickstart.md", "concepts.md", "python-api.md", "configuration.md", "troubleshooting.md",
         "recipes/gsm8k.md"]


@pytest.mark.parametrize("page", PAGES)
def test_the_pages_links_resolve(page):
    path = ROOT / "docs" / page
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        assert (path.parent / target.split("#")[0]).exists(), f"{page}: broken link {target}"
