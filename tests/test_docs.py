"""The documentation holds together: every relative link and #anchor in README.md and docs/*.md resolves, and the
README's blocks marked quick (a fence opened with ```bash quick) run from an empty directory and leave their
outputs where the README's "Where outputs go" table says.

The quick blocks run shortened: SHORTEN's overrides are appended to each esq-train / esq-eval command (the README's
Tests section states them), so a block stays a few seconds per command.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
BIN = Path(sys.executable).parent

# Appended to every command of a quick block that starts with the key; the README's Tests section names them.
SHORTEN = {
    "esq-train": "trainer.max_epochs=1 eval.n_samples=20 threads=1 progress=false",
    "esq-eval": "eval.n_samples=20 threads=1 progress=false",
}

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, inline code removed."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(re.sub(r"`[^`]*`", "``", line))
    return lines


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a markdown file (repeats get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in path.read_text().splitlines():
        if FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if in_fence or not m:
            continue
        slug = github_anchor(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    links = []
    for line in _prose_lines(path.read_text()):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            links.append(target)
    return links


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    return broken


def test_anchor_rule_matches_github() -> None:
    assert (
        github_anchor("Error-silenced training and the paper's settings")
        == "error-silenced-training-and-the-papers-settings"
    )
    assert github_anchor("Worst case and audit (seed 0)") == "worst-case-and-audit-seed-0"
    assert github_anchor("W&B") == "wb"
    assert github_anchor("4. Data parallel") == "4-data-parallel"
    assert (
        github_anchor("Threat model: `eval.eps` decides every L_inf budget")
        == "threat-model-evaleps-decides-every-l_inf-budget"
    )


def test_link_checker_finds_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text(
        "# Title\n\n## Part one\n\nsee [b](b.md#nowhere), [one](#part-one), [x](x.md)\n"
        "```\n[in code](ignored.md)\n```\n"
    )
    (tmp_path / "b.md").write_text("# B\n")
    assert [b.split(" ")[0] for b in broken_links(tmp_path / "a.md")] == ["b.md#nowhere", "x.md"]


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(path: Path) -> None:
    assert relative_links(path) or path != README, "README.md has no links: the extraction is broken"
    assert broken_links(path) == [], f"{path.name}: broken links"


def quick_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash quick\n(.*?)^```", text, re.S | re.M)


def shortened(block: str) -> str:
    """The block as a bash script, each esq-train / esq-eval command with SHORTEN's overrides appended."""
    lines = []
    for line in block.replace("\\\n", " ").splitlines():
        command = re.sub(r"\s+#.*$", "", line).rstrip()  # leading blanks stay: a block may hold python -c "..."
        if not command.strip():
            continue
        tool = command.split()[0]
        lines.append(f"{command} {SHORTEN[tool]}" if tool in SHORTEN else command)
    return "set -euo pipefail\n" + "\n".join(lines) + "\n"


def run_block(block: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    return subprocess.run(
        ["bash", "-c", shortened(block)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def outputs_table() -> dict[str, tuple[str, str]]:
    """README's "Where outputs go" table: command -> (writes to, what is there)."""
    text = README.read_text()
    section = text.split("## Where outputs go", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`esq-"):
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def test_quick_blocks_are_found_and_shortened() -> None:
    blocks = quick_blocks(README.read_text())
    assert len(blocks) >= 2, "README.md lost its quick blocks"
    script = shortened("esq-train   # a comment\nesq-eval ckpt_path=a \\\n  mode=audit\nls\n")
    assert script.splitlines()[1:] == [
        f"esq-train {SHORTEN['esq-train']}",
        f"esq-eval ckpt_path=a    mode=audit {SHORTEN['esq-eval']}",
        "ls",
    ]


def _place(cell: str, **values: str) -> str:
    """The first backticked path of a table cell, its <placeholders> filled in (glob * for <time>)."""
    pattern = re.search(r"`([^`]+)`", cell).group(1)
    for key, value in {"time": "*", **values}.items():
        pattern = pattern.replace(f"<{key}>", value)
    return pattern


@pytest.mark.slow  # about 60-90 s on 2 shared cores: two 1-epoch runs, an evaluation, an export and a report
def test_readme_outputs_block_runs_and_writes_where_the_table_says(tmp_path: Path) -> None:
    block = next(b for b in quick_blocks(README.read_text()) if b.lstrip().startswith("esq-train"))
    proc = run_block(block, tmp_path)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    table = outputs_table()

    where, what = table["esq-train"]
    (run,) = tmp_path.glob(_place(where, data="digits", model="small_cnn", setting="EB", seed="0"))
    for item in (
        "results.json",
        "checkpoints/final.ckpt",
        "checkpoints/last.ckpt",
        "checkpoints/epochNNN.ckpt",
        "csv/metrics.csv",
        ".hydra/",
        "config.yaml",
        "overrides.yaml",
        "hydra.yaml",
        "train.log",
    ):
        assert f"`{item}`" in what, f"the esq-train row does not name {item}"
    for item in (
        "results.json",
        "checkpoints/final.ckpt",
        "checkpoints/last.ckpt",
        "checkpoints/epoch000.ckpt",
        "csv/metrics.csv",
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        ".hydra/hydra.yaml",
        "train.log",
    ):
        assert (run / item).is_file(), f"{item} missing in {run}"

    where, what = table["esq-eval"]
    (ev,) = tmp_path.glob(_place(where, mode="whitebox"))
    assert "`results.json`" in what and "`eval_state/`" in what and "`.hydra/`" in what
    assert (ev / "results.json").is_file() and (ev / "eval_state").is_dir() and (ev / ".hydra").is_dir()

    where, _ = table["esq-export ckpt_path=C"]
    assert "`.esq`" in where and "`final.esq` beside `final.ckpt`" in where
    assert (run / "checkpoints" / "final.esq").is_file()

    where, what = table["esq-report runs=DIR"]
    report = tmp_path / _place(where).replace("DIR", "outputs/runs")
    for item in ("report.md", "report.tex", "whitebox.csv"):
        assert f"`{item}`" in what and (report / item).is_file(), item

    # paths.runs_root=X: the run goes under X/runs/, the table's esq-train path with outputs/ replaced by X/
    where, _ = table["esq-train"]
    assert "`X/runs/...`" in README.read_text()
    (moved,) = tmp_path.glob(
        _place(where, data="digits", model="small_cnn", setting="EB", seed="0").replace("outputs/", "scratch/", 1)
    )
    assert (moved / "results.json").is_file()


def test_readme_reproduce_dry_run_block_runs_and_writes_nothing(tmp_path: Path) -> None:
    block = next(b for b in quick_blocks(README.read_text()) if "esq-reproduce" in b)
    proc = run_block(block, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "esq-train -m sweep=pretrain_digits" in proc.stdout and "esq-report" in proc.stdout
    where, _ = outputs_table()["esq-reproduce scale=S"]
    assert _place(where, S="digits") in proc.stdout  # the stages write under the folder the table names
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # the CIFAR export example of docs/configuration.md: about 20 s of CPU time
@pytest.mark.parametrize("path", [p for p in DOCS if quick_blocks(p.read_text())], ids=lambda p: p.name)
def test_docs_quick_blocks_run_from_an_empty_directory(path: Path, tmp_path: Path) -> None:
    for block in quick_blocks(path.read_text()):
        proc = run_block(block, tmp_path)
        assert proc.returncode == 0, (block, proc.stdout[-2000:], proc.stderr[-3000:])
    if path.name == "configuration.md":  # the export example writes the file it measures
        assert (tmp_path / "exp" / "model.esq").is_file()


def test_outputs_table_has_a_row_per_command() -> None:
    rows = outputs_table()
    assert {"esq-train", "esq-eval", "esq-export ckpt_path=C", "esq-report runs=DIR", "esq-reproduce scale=S"} <= set(
        rows
    )
    assert any(key.startswith("esq-train -m") for key in rows) and any(key.startswith("esq-eval -m") for key in rows)
    assert _place(rows["esq-train"][0], data="d", model="m", setting="S", seed="0") == "outputs/runs/d-m-S/*_seed0/"
