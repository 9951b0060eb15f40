"""The shipped docs stand alone and stay true to the code.

README.md and docs/ are what a user gets: the metric table, the config reference and the
command table must cover what the code defines (read from the code itself, so a new metric,
key or flag fails here until it is documented), no shipped file may point at files that are
not shipped or at a machine's own paths, and every relative link must land. Fast: no daemon,
no network; the parser, the pydantic models and the metric registry are walked in-process.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import ROOT
from pydantic import BaseModel

README = ROOT / "README.md"
DOCS = ROOT / "docs"


# --- reading Markdown ------------------------------------------------------------------------


def _strip_code_blocks(text: str) -> str:
    """The text with fenced code blocks blanked (line count kept): links and tables live outside them."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
            continue
        out.append("" if fenced else line)
    return "\n".join(out)


def _section(text: str, heading: str, code: bool = False) -> str:
    """The lines under `heading` (a whole heading line) up to the next heading of its level or
    higher; fenced code blocks blanked unless `code`."""
    level = len(heading) - len(heading.lstrip("#"))
    prose = _strip_code_blocks(text).splitlines()  # a `# comment` in a code block is no heading
    lines = text.splitlines() if code else prose
    assert heading in prose, f"the heading {heading!r} is gone; the docs test reads that section"
    start = prose.index(heading) + 1
    end = next(
        (i for i in range(start, len(prose)) if re.match(rf"#{{1,{level}}} ", prose[i])),
        len(prose),
    )
    return "\n".join(lines[start:end])


def _cells(line: str) -> list[str]:
    """The cells of one table row; `\\|` inside a cell is a literal bar, not a separator."""
    parts = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [p.strip().replace("\\|", "|") for p in parts]


def _table_with(section: str, header_cell: str, where: str) -> list[list[str]]:
    """The first table of `section` whose first header cell is `header_cell`."""
    for line_block in _raw_tables(section):
        if _cells(line_block[0])[0] == header_cell:
            return [_cells(row) for row in line_block[2:]]
    raise AssertionError(f"{where}: no table headed `{header_cell}` any more; the docs test reads it")


def _raw_tables(section: str) -> Iterator[list[str]]:
    block: list[str] = []
    for line in [*section.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            yield block
            block = []


def _code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


# --- 1. every metric the code exports is in the README's metric table -------------------------


def _exported_families() -> dict[str, str]:
    """Every keepwarm metric family the code can export, name (as scraped) to type.

    A `full`-mode registry with a budget and a fleet membership set holds every family there is:
    the per-pair ones, the process-wide ones, and those only a budget or a fleet brings.
    """
    from keepwarm.metrics import Metrics

    metrics = Metrics(per_pair="full")
    metrics.set_budget(1.0, 0.0)
    metrics.set_fleet(1, 0, 0, 0)
    families = {}
    for family in metrics.registry.collect():
        if not family.name.startswith("keepwarm_"):
            continue  # prometheus_client's own process_* collector
        name = family.name + "_total" if family.type == "counter" else family.name
        families[name] = family.type
    return families


def test_every_exported_metric_is_in_the_readme_metric_table() -> None:
    families = _exported_families()
    assert len(families) > 20, f"the registry walk found only {sorted(families)}"
    rows = _table_with(_section(README.read_text(encoding="utf-8"), "## Metrics"), "metric", "README.md ## Metrics")
    documented = {}
    for row in rows:
        for name in _code_spans(row[0]):
            documented[name] = row[1]
    missing = sorted(set(families) - set(documented))
    assert not missing, f"README.md, the table under ## Metrics, lacks a row for: {', '.join(missing)}"
    wrong_type = {n: (documented[n], t) for n, t in families.items() if documented[n] != t}
    assert not wrong_type, f"README.md ## Metrics: documented type differs from the code's (doc, code): {wrong_type}"
    gone = sorted(n for n in documented if n.startswith("keepwarm_") and n not in families)
    assert not gone, f"README.md ## Metrics documents metrics the code no longer exports: {', '.join(gone)}"


def test_every_label_value_is_in_its_metric_row() -> None:
    """A label's values are the interface alerts and dashboards match on: each is listed in its
    family's row, or in the row it refers to with "same kinds"."""
    from keepwarm.metrics import _FAMILIES, REJECT_REASONS

    readme = README.read_text(encoding="utf-8")
    rows = {}
    for row in _table_with(_section(readme, "## Metrics"), "metric", "README.md ## Metrics"):
        for name in _code_spans(row[0]):
            rows[name] = " ".join(row[1:])
    labelled = {f.name: f.values for f in _FAMILIES if f.label}
    labelled["keepwarm_observations_rejected_total"] = tuple(REJECT_REASONS)
    assert "keepwarm_cache_misses_total" in labelled, sorted(labelled)
    missing = []
    for name, values in labelled.items():
        text = rows.get(name, "")
        if "same kinds" in text:
            text += rows["keepwarm_cost_usd_total"]  # the family whose kinds the row lists
        missing += [f"{name}: `{v}`" for v in values if f"`{v}`" not in text]
    assert not missing, f"README.md ## Metrics rows lack label values: {', '.join(missing)}"


# --- 2. every config key the loader accepts is in the config reference ------------------------


def _models_in(annotation: Any) -> tuple[list[tuple[type[BaseModel], bool]], bool]:
    """The pydantic models a field's annotation holds (each with whether it sits in a list), and
    whether the field also takes a plain value (as `ledger: off` does)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        models: list[tuple[type[BaseModel], bool]] = []
        plain = False
        for arg in typing.get_args(annotation):
            if arg is type(None):
                continue
            inner, inner_plain = _models_in(arg)
            models += inner
            plain = plain or inner_plain
        return models, plain
    if origin is list:
        inner, inner_plain = _models_in(typing.get_args(annotation)[0])
        return [(m, True) for m, _ in inner], inner_plain
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, False)], False
    return [], True


def _keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every key a user can write under `model`, dotted, with `[]` for a list's items."""
    for name, field in model.model_fields.items():
        key = prefix + name
        models, plain = _models_in(field.annotation)
        if plain or not models:
            yield key
        for sub, in_list in models:
            yield from _keys(sub, key + ("[]." if in_list else "."))


def _config_keys() -> list[str]:
    """The keys `keepwarm.config` accepts. `experts` and `accounts` are lists the loader validates
    item by item with their own models (one bad item must not hide the others' problems), so
    their items are walked with those models."""
    from keepwarm.config import AccountSection, ExpertSection, FileSection

    itemwise = {"experts": ExpertSection, "accounts": AccountSection}
    for name in itemwise:
        assert name in FileSection.model_fields, f"keepwarm/config.py: FileSection has no `{name}` any more"
    keys = []
    for key in _keys(FileSection):
        if key in itemwise:
            keys += [key, *_keys(itemwise[key], key + "[].")]
        else:
            keys.append(key)
    return keys


def _documented_keys(rows: list[list[str]], prefix: str = "") -> set[str]:
    """The keys a reference table's first column names: `a.b`, then bare `c` meaning `a.c`."""
    keys = set()
    for row in rows:
        spans = _code_spans(row[0])
        if not spans:
            continue
        head = spans[0]
        base = head[: head.rfind(".") + 1] if "." in head else ""
        for span in spans:
            keys.add(prefix + (span if "." in span else base + span))
    return keys


def test_every_config_key_is_in_the_config_reference() -> None:
    readme = README.read_text(encoding="utf-8")
    documented = _documented_keys(_table_with(_section(readme, "## Configuration"), "key", "README.md ## Configuration"))
    providers = (DOCS / "providers.md").read_text(encoding="utf-8")
    account_rows = _table_with(_section(providers, "## The config"), "key", "docs/providers.md ## The config")
    documented |= _documented_keys(account_rows, prefix="accounts[].")
    keys = _config_keys()
    assert "api.base_url" in keys and "experts[].system[].file" in keys, f"the model walk went wrong: {keys}"
    # A list documented through its items (`experts[].name`) is documented.
    missing = [k for k in keys if k not in documented and not any(d.startswith(k + "[].") for d in documented)]
    in_readme = [k for k in missing if not k.startswith("accounts[].")]
    in_providers = [k for k in missing if k.startswith("accounts[].")]
    assert not in_readme, f"README.md, the table under ## Configuration, lacks: {', '.join(in_readme)}"
    assert not in_providers, f"docs/providers.md, the table under ## The config, lacks: {', '.join(in_providers)}"
    sections = {k[: i] for k in keys for i in range(len(k)) if k[i] in ".["}  # `experts[].system` too
    stale = sorted(k for k in documented if k not in keys and k not in sections)
    assert not stale, f"the config reference documents keys the loader rejects: {', '.join(stale)}"


# --- 3. every command and flag is in the README's command table ------------------------------


def _commands() -> Iterator[tuple[str, list[list[str]]]]:
    """Each `keepwarm` (sub)command, as `ledger copy`, with the option strings of each of its flags."""
    from keepwarm.cli import _parser

    def walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, list[list[str]]]]:
        flags = [a.option_strings for a in parser._actions
                 if a.option_strings and not isinstance(a, argparse._HelpAction)]
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if flags or not subs:  # a command that only groups others (`ledger`) is covered by them
            yield path, flags
        for action in subs:
            for name, child in action.choices.items():
                yield from walk(child, f"{path} {name}".strip())

    yield from walk(_parser(), "")


def _row_commands(cell: str) -> set[str]:
    """The commands a row's first cell names: `keepwarm run|once --config F` names `run` and `once`."""
    match = re.match(r"`keepwarm ((?:[a-z|]+ ?)+)", cell)
    if not match:
        return set()
    first, *rest = match.group(1).split()
    return {" ".join([alt, *rest]) for alt in first.split("|")}


def _mentions(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def test_every_command_and_flag_is_in_the_readme_command_table() -> None:
    section = _section(README.read_text(encoding="utf-8"), "## Commands")
    rows = _table_with(section, "command", "README.md ## Commands")
    prose = "\n".join(line for line in section.splitlines() if not line.startswith("|"))
    problems = []
    commands = list(_commands())
    assert any(path == "ledger copy" for path, _ in commands), f"the parser walk went wrong: {commands}"
    for path, flags in commands:
        if not path:  # the top-level flags (`--version`, `-v`): said in the prose under the table
            own_rows: list[list[str]] = []
        else:
            own_rows = [row for row in rows if path in _row_commands(row[0])]
            if not own_rows:
                problems.append(f"`keepwarm {path}` has no row")
                continue
        text = " ".join(" ".join(row) for row in own_rows) + "\n" + prose
        for options in flags:
            if not any(_mentions(text, o) for o in options):
                problems.append(f"`keepwarm {path}` flag {' / '.join(options)} is not mentioned")
    assert not problems, "README.md, the table under ## Commands (or the text below it): " + "; ".join(problems)


# --- 4. shipped files point at nothing that is not shipped -----------------------------------

# What a user installs, deploys or reads. (bench/results/ is measured data and keeps what the
# profiler recorded, interpreter paths included.)
SHIPPED = ("README.md", "docs", "deploy", "systemd", "config", "keepwarm", "Dockerfile", "pyproject.toml", "scripts",
           "tests")
FORBIDDEN = re.compile(
    r"SPEC\.md|STYLE\.md|\.\./shared|\bSPEC\b(?! ?=)"  # the contract we write to is not shipped
    r"|(?<![\w.~-])/(?:work|home|root)/"  # a machine's own directories
    r"|/tmp/pytest"
)


def _shipped_files() -> Iterator[Path]:
    for name in SHIPPED:
        path = ROOT / name
        if path.is_file():
            yield path
            continue
        for file in sorted(path.rglob("*")):
            # This file names what it forbids.
            if (file.is_file() and "__pycache__" not in file.parts and file.suffix not in (".pyc", ".db")
                    and file != Path(__file__).resolve()):
                yield file


def test_no_shipped_file_mentions_unshipped_files_or_machine_paths() -> None:
    files = list(_shipped_files())
    assert len(files) > 50, f"the walk found only {len(files)} shipped files"
    hits = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary: nothing a reader follows
        for number, line in enumerate(text.splitlines(), 1):
            for match in FORBIDDEN.finditer(line):
                hits.append(f"{file.relative_to(ROOT)}:{number}: {match.group(0)!r}")
    assert not hits, "shipped files must stand alone; remove these mentions:\n" + "\n".join(hits)


def test_the_forbidden_pattern_catches_what_it_must_and_spares_urls() -> None:
    caught = ["see SPEC.md §3", "STYLE.md says", "../shared/reference", "/work/main/x", "/tmp/pytest-of-root/x",
              "cd /home/alice"]
    spared = ["https://example.com/work/x", "~/work/notes", "docs/work/x", "/var/lib/keepwarm", "/tmp/keepwarm"]
    assert all(FORBIDDEN.search(s) for s in caught), [s for s in caught if not FORBIDDEN.search(s)]
    assert not any(FORBIDDEN.search(s) for s in spared), [s for s in spared if FORBIDDEN.search(s)]


# --- 5. relative links land on a file and an anchor that exist -------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*|<[^>]+>", "", heading.strip().lstrip("#").strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _strip_code_blocks(path.read_text(encoding="utf-8")).splitlines():
        if not re.match(r"#{1,6} ", line):
            continue
        slug = _slug(line)
        n = seen.get(slug, 0)
        anchors.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return anchors


LINK = re.compile(r"\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _links(path: Path) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(_strip_code_blocks(path.read_text(encoding="utf-8")).splitlines(), 1):
        line = re.sub(r"`[^`]*`", "", line)  # a link inside a code span is text, not a link
        for match in LINK.finditer(line):
            yield number, match.group(1)


def test_relative_links_in_the_readme_and_docs_land() -> None:
    pages = [README, *sorted(DOCS.glob("*.md"))]
    broken = []
    checked = 0
    for page in pages:
        for number, target in _links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # http(s):, mailto:: not ours to check offline
            checked += 1
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(ROOT)}:{number}: {target}"
            if not dest.exists():
                broken.append(f"{where} (no file {file_part})")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert checked > 10, f"only {checked} relative links found: the link pattern broke"
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_slugs_follow_githubs_rule() -> None:
    assert _slug("## Against the emulator, with the official clients") == "against-the-emulator-with-the-official-clients"
    assert _slug("## When a pair is pinged: policies, active hours, budget") == "when-a-pair-is-pinged-policies-active-hours-budget"
    assert _slug("### Python: `keepwarm.observe`") == "python-keepwarmobserve"
    assert _slug("## Does it pay for itself?") == "does-it-pay-for-itself"


# --- the alerts and the modules a reader meets ------------------------------------------------


def test_every_shipped_alert_is_named_in_the_readme() -> None:
    import yaml

    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "keepwarm-rules.yml").read_text(encoding="utf-8"))
    alerts = sorted({r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r})
    assert len(alerts) > 10, f"the rules walk found only {alerts}"
    readme = README.read_text(encoding="utf-8")
    missing = [a for a in alerts if not re.search(rf"`{a}`", readme)]
    assert not missing, f"README.md (## Deploy, Wiring the alerts) does not name: {', '.join(missing)}"


def test_every_module_is_in_the_readme_layout() -> None:
    section = _section(README.read_text(encoding="utf-8"), "## Development")
    named = set(_code_spans(section))
    modules = sorted(
        p.stem if p.is_file() else p.name + "/"
        for p in (ROOT / "keepwarm").iterdir()
        if (p.suffix == ".py" and not p.stem.startswith("_")) or (p.is_dir() and (p / "__init__.py").exists())
    )
    assert "cli" in modules and "store/" in modules, modules
    missing = [m for m in modules if m not in named]
    assert not missing, f"README.md, the layout under ## Development, does not name: {', '.join(missing)}"


def test_the_emulators_python_interface_is_documented() -> None:
    """docs/emulator.md's `## Python interface` names every parameter, public method and log field."""
    import dataclasses
    import inspect

    from keepwarm.emulator import Emulator, LogEntry, serve

    section = _section((DOCS / "emulator.md").read_text(encoding="utf-8"), "## Python interface", code=True)
    names = [f"Emulator({p})" for p in inspect.signature(Emulator.__init__).parameters if p != "self"]
    names += [f"serve({p})" for p in inspect.signature(serve).parameters]
    names += [f"emu.{m}" for m in dir(Emulator) if not m.startswith("_")]
    names += [f"LogEntry.{f.name}" for f in dataclasses.fields(LogEntry)]
    assert len(names) > 20, names
    missing = [n for n in names if not re.search(rf"\b{re.escape(n.split('(')[-1].rstrip(')').split('.')[-1])}\b", section)]
    assert not missing, f"docs/emulator.md, ## Python interface, does not mention: {', '.join(missing)}"


def test_every_command_line_in_the_docs_uses_real_flags() -> None:
    """A `keepwarm CMD --flag` written in README.md or docs/ (code spans and blocks) names a flag
    CMD has: a renamed or removed flag fails here rather than in a reader's terminal."""
    commands = {path: {o for options in flags for o in options} for path, flags in _commands()}
    top = commands.pop("")
    names = {path.split()[0] for path in commands}
    bad, seen = [], 0
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for code in re.findall(r"```.*?```", text, re.S) + re.findall(r"`[^`\n]+`", text):
            for line in code.splitlines():
                for m in re.finditer(r"(?<![\w/.-])keepwarm((?: +-v)?) +([a-z][a-z-]*)( +copy)?([^`|;&#]*)", line):
                    if m.group(2) not in names or (m.group(2) == "ledger" and not m.group(3)):
                        continue
                    path = m.group(2) + (m.group(3) or "")
                    seen += 1
                    own = commands.get(" ".join(path.split()), set()) | top
                    for flag in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", m.group(4)):
                        if flag not in own:
                            bad.append(f"{page.relative_to(ROOT)}: `keepwarm {path}` has no {flag}: {line.strip()[:100]}")
    assert seen > 20, f"only {seen} command lines found: the pattern broke"
    assert not bad, "\n".join(bad)


def _without_comments(text: str) -> str:
    return re.sub(r"<!--.*?-->", "", text, flags=re.S).strip()


def test_the_readmes_pays_section_is_docs_pays_md() -> None:
    """README's "Does it pay for itself?" is docs/pays.md (generated from the price table, kept
    current by tests/test_report.py): a regenerated pays.md must reach the README too."""
    readme = README.read_text(encoding="utf-8")
    heading = "## Does it pay for itself?"
    body = readme[readme.index(heading) + len(heading):]
    body = body[: body.index("\nFor your own prompts")]
    pays = (DOCS / "pays.md").read_text(encoding="utf-8")
    assert pays.startswith(heading), "docs/pays.md starts with its own heading"
    assert _without_comments(body) == _without_comments(pays[len(heading):]), (
        "README.md, ## Does it pay for itself?, differs from docs/pays.md: copy docs/pays.md (below its heading) there"
    )


def test_the_readmes_policy_figures_are_the_benchmark_tables() -> None:
    """The README quotes the policy benchmark's total row; docs/policy.md's table is regenerated
    by `bench/policy.py --write-docs`, and the quote must follow it."""
    policy = (DOCS / "policy.md").read_text(encoding="utf-8")
    table = policy[policy.index("<!-- policy-table:begin -->"): policy.index("<!-- policy-table:end -->")]
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header, body = _cells(lines[0]), [_cells(line) for line in lines[2:]]
    total = dict(zip(header, next(row for row in body if row[0] == "**total**")))
    shapes = len([row for row in body if row[0] != "**total**"])
    readme = " ".join(README.read_text(encoding="utf-8").split())
    quote = re.search(r"On the benchmark's (\d+) traffic shapes.*?`adaptive` costs ([\d.]+)× the hindsight optimum"
                      r" in total, `fixed` ([\d.]+)× and no keepalive ([\d.]+)×", readme)
    assert quote, "README.md (## When a pair is pinged) no longer quotes the policy benchmark's totals"
    quoted = (int(quote.group(1)), quote.group(2), quote.group(3), quote.group(4))
    assert quoted == (shapes, total["adaptive"], total["fixed"], total["none"]), (
        f"README.md quotes {quoted}; docs/policy.md's table says {(shapes, total['adaptive'], total['fixed'], total['none'])}"
    )
