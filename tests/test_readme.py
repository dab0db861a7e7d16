"""The README's code blocks, run as a reader runs them: a test that fails when the README drifts.

Every fenced block in README.md has an HTML comment on the line before it (blank lines between
are allowed) saying how this test runs it:

    <!-- readme-test: run -->                       run as written
    <!-- readme-test: run | OLD => NEW | ... -->    run with these text substitutions, for tiny sizes
                                                    (`-n 8 => -n 1`); each must match somewhere in the
                                                    block, so a marker cannot silently fall out of date
    <!-- readme-test: run if COND,... | ... -->     run only where every COND holds (CONDITIONS below);
                                                    elsewhere skipped, saying which one is missing
    <!-- readme-test: skip | REASON -->            skipped, with the reason

A block without a marker, or with a marker this file does not understand, fails. The blocks run
in README order in one temporary folder (later blocks use the files of earlier ones, as in a
reader's shell): bash blocks with `bash -euo pipefail` and this Python's console scripts first on
PATH, python blocks with this Python. `$README_TEST` names this file: `python "$README_TEST"
emoji5 DIR` writes a small stand-in of the Emoji-5 image set, whose real build downloads from npm
and Debian, so that the training commands after it run as written (at tiny step counts).

Run the whole file (`pytest tests/test_readme.py`): one block alone may miss the files of the
blocks before it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)\s*$")
RUNNERS = {"bash": ["bash", "-euo", "pipefail", "-c"], "python": [sys.executable, "-c"]}
BLOCK_TIMEOUT_S = 900


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _has_ort_cuda() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return _has_cuda() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
        import tensorrt.plugin  # noqa: F401
    except ImportError:
        return False
    return _has_cuda()


CONDITIONS = {  # name -> (check, what is missing when it fails)
    "cuda": (_has_cuda, "needs a CUDA GPU"),
    "ort-cuda": (_has_ort_cuda, "needs onnxruntime-gpu's CUDA provider and a GPU"),
    "tensorrt": (_has_tensorrt, "needs NVIDIA TensorRT >= 10.9 with tensorrt.plugin and a GPU (docs/tensorrt.md)"),
}


@dataclass
class Block:
    line: int            # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None   # the text after "readme-test:", None if the block has no marker

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang or 'text'}"


@dataclass
class Plan:
    mode: str                       # "run" | "skip"
    reason: str = ""
    conditions: tuple = ()
    substitutions: tuple = ()       # ((old, new), ...)


def read_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = MARKER.match(lines[k]) if k >= 0 else None
        blocks.append(Block(i + 1, m.group(1), "\n".join(lines[i + 1:j]) + "\n", marker.group(1) if marker else None))
        i = j + 1
    return blocks


def parse_marker(block: Block) -> Plan:
    """The plan for a block; ValueError names the line and what is wrong with its marker."""
    where = f"README.md line {block.line}"
    if block.marker is None:
        raise ValueError(f"{where}: a ```{block.lang} block without a '<!-- readme-test: ... -->' marker before it")
    head, *rest = [part.strip() for part in block.marker.split("|")]
    if head == "skip":
        if not rest or not rest[0]:
            raise ValueError(f"{where}: 'skip' needs a reason: <!-- readme-test: skip | REASON -->")
        return Plan("skip", reason=" | ".join(rest))
    conditions = ()
    if head.startswith("run if "):
        conditions = tuple(c.strip() for c in head[len("run if "):].split(","))
        unknown = [c for c in conditions if c not in CONDITIONS]
        if unknown:
            raise ValueError(f"{where}: unknown condition {unknown[0]!r}; choose from {', '.join(CONDITIONS)}")
    elif head != "run":
        raise ValueError(f"{where}: marker {head!r} is not 'run', 'run if COND', or 'skip | REASON'")
    if block.lang not in RUNNERS:
        raise ValueError(f"{where}: cannot run a ```{block.lang} block; mark it 'skip | REASON' or use "
                         f"{' / '.join(RUNNERS)}")
    substitutions = []
    for part in rest:
        if "=>" not in part:
            raise ValueError(f"{where}: substitution {part!r} is not of the form 'OLD => NEW'")
        old, new = (x.strip() for x in part.split("=>", 1))
        substitutions.append((old, new))
    return Plan("run", conditions=conditions, substitutions=tuple(substitutions))


def rewrite(code: str, plan: Plan, line: int) -> str:
    for old, new in plan.substitutions:
        if old not in code:
            raise AssertionError(f"README.md line {line}: the marker's substitution {old!r} matches nothing in the "
                                 "block: update the marker with the block")
        code = code.replace(old, new)
    return code


BLOCKS = read_blocks(README.read_text())


def test_every_block_is_marked():
    """Checked once, quickly, before any block runs: every block has a marker this file understands."""
    assert BLOCKS, "README.md has no code blocks"
    problems = []
    for block in BLOCKS:
        try:
            parse_marker(block)
        except ValueError as e:
            problems.append(str(e))
    assert not problems, "\n".join(problems)


def test_marker_parsing():
    """The marker grammar on made-up blocks (each line of it can fail)."""
    md = ("<!-- readme-test: run | -n 8 => -n 1 | --grid 9x9 => -->\n\n```bash\nx -n 8 --grid 9x9\n```\n"
          "```python\nprint(1)\n```\n"
          "<!-- readme-test: skip | needs the moon -->\n```bash\nfly\n```\n"
          "<!-- readme-test: run if cuda,tensorrt -->\n```bash\ngo\n```\n")
    a, b, c, d = read_blocks(md)
    plan = parse_marker(a)
    assert plan.substitutions == (("-n 8", "-n 1"), ("--grid 9x9", "")) and a.line == 3
    assert rewrite(a.code, plan, a.line) == "x -n 1 \n"
    with pytest.raises(AssertionError, match="matches nothing"):
        rewrite("x -n 4\n", plan, 3)
    with pytest.raises(ValueError, match="without a '<!-- readme-test"):
        parse_marker(b)
    assert parse_marker(c) == Plan("skip", reason="needs the moon")
    assert parse_marker(d).conditions == ("cuda", "tensorrt")
    for bad, msg in [("skip", "needs a reason"), ("run if moon", "unknown condition 'moon'"),
                     ("walk", "is not 'run'"), ("run | -n 8", "not of the form")]:
        with pytest.raises(ValueError, match=msg):
            parse_marker(Block(1, "bash", "x\n", bad))
    with pytest.raises(ValueError, match="cannot run a ```yaml block"):
        parse_marker(Block(1, "yaml", "x\n", "run"))


# How the README names each command -> its click command (the console scripts of pyproject.toml,
# and the modules it runs with `python -m` / `torchrun -m`).
COMMANDS = {
    "lasad-run": ("lasad_engine.cli", "run_main"),
    "lasad-serve": ("lasad_engine.serve.cli", "serve_main"),
    "lasad-export": ("lasad_tools.export", "main"),
    "lasad-check": ("lasad_tools.check", "main"),
    "lasad-profile": ("lasad_tools.profile", "main"),
    "lasad-eval": ("lasad_tools.evaluate", "main"),
    "lasad-train": ("lasad_train.cli", "main"),
    "lasad_tools.ort_op": ("lasad_tools.ort_op", "main"),
    "lasad_train.cli": ("lasad_train.cli", "main"),
}
# Options the README gives to other programs (pip, torchrun, pytest).
FOREIGN_OPTIONS = {"--index-url", "--nproc_per_node"}
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_]*|\.\.\.)$")  # SRC, OUT, CKPT, ...


def command_lines(text: str) -> list[tuple[int, str]]:
    """(line, command text) for every line of every code block (comments cut, backslash continuations
    joined) and every inline `code` span of the prose (spans may wrap across lines)."""
    out, prose, inblock, cont = [], [], False, ""
    for no, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line) or line.strip() == "```":
            inblock = not inblock
        elif inblock:
            code = re.sub(r"\s+#.*$", "", line)
            if code.endswith("\\"):
                cont += code[:-1] + " "
                continue
            out.append((no, cont + code))
            cont = ""
        else:
            prose.append((no, line))
    joined, starts = "", []
    for no, line in prose:
        starts.append((len(joined), no))
        joined += line + " "
    for m in re.finditer(r"`([^`]+)`", joined):
        out.append((max(no for off, no in starts if off <= m.start()), m.group(1)))
    return out


def _options(command) -> set[str]:
    import click
    names = {"--help", "-h"}
    for p in command.params:
        if isinstance(p, click.Option):
            names.update(p.opts)
            names.update(p.secondary_opts)
    return names


def _all_commands():
    """Every click command reachable from COMMANDS (subcommands of groups included)."""
    import importlib

    import click
    ctx = click.Context(click.Command("readme"))
    seen, todo = [], [getattr(importlib.import_module(m), a) for m, a in set(COMMANDS.values())]
    while todo:
        cmd = todo.pop()
        if any(cmd is c for c in seen):
            continue
        seen.append(cmd)
        if isinstance(cmd, click.Group):
            todo += [cmd.get_command(ctx, name) for name in cmd.list_commands(ctx)]
    return seen


SCRIPT = re.compile(r"^(benchmarks/\w+\.py)$")  # `python benchmarks/NAME.py ...`: a script of this repository


def _script_options(script: str) -> set[str] | None:
    """The options a benchmark script's `--help` lists (argparse), or None if it has no --help."""
    path = README.parent / script
    if not path.is_file():
        return None
    r = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=300,
                       cwd=README.parent)
    if r.returncode != 0:
        return None
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", r.stdout)) | {"-h", "--help"}


def check_commands(text: str) -> list[str]:
    """What is wrong with the README's commands: a subcommand or an option that the command does
    not have (each lasad command line, in code blocks and in the prose), and any `--option`
    written anywhere that no lasad command has."""
    import importlib

    import click
    ctx = click.Context(click.Command("readme"))
    problems, scripts = [], {}
    for no, line in command_lines(text):
        for piece in re.split(r"&&|\|\|?|;", line):
            try:
                words = shlex.split(piece)
            except ValueError:
                continue
            at = next((i for i, w in enumerate(words) if SCRIPT.match(w) and i and words[i - 1] in ("python", "python3")),
                      None)
            if at is not None:  # a benchmark script: its options are its argparse options
                script = words[at]
                if script not in scripts:
                    scripts[script] = _script_options(script)
                if scripts[script] is None:
                    problems.append(f"README.md line {no}: {script} is not a script with --help")
                    continue
                for word in words[at + 1:]:
                    if re.match(r"^--?[A-Za-z]", word) and word.split("=", 1)[0] not in scripts[script]:
                        problems.append(f"README.md line {no}: {script} has no option {word.split('=', 1)[0]}")
                continue
            start = next((i for i, w in enumerate(words) if w in COMMANDS and (i == 0 or words[i - 1] == "-m")), None)
            if start is None:
                continue
            name, rest = words[start], words[start + 1:]
            cmd = getattr(importlib.import_module(COMMANDS[name][0]), COMMANDS[name][1])
            while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
                sub = cmd.get_command(ctx, rest[0])
                if sub is None:
                    if not PLACEHOLDER.match(rest[0]):
                        problems.append(f"README.md line {no}: {name} has no subcommand {rest[0]!r}")
                    break
                name, cmd, rest = f"{name} {rest[0]}", sub, rest[1:]
            known = _options(cmd)
            for word in rest:
                if re.match(r"^--?[A-Za-z]", word) and word.split("=", 1)[0] not in known:
                    problems.append(f"README.md line {no}: {name} has no option {word.split('=', 1)[0]}")
    everywhere = set().union(*(_options(c) for c in _all_commands()), *(o for o in scripts.values() if o)) \
        | FOREIGN_OPTIONS
    for no, line in enumerate(text.splitlines(), 1):
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", line):
            if option not in everywhere:
                problems.append(f"README.md line {no}: no lasad command has the option {option}")
    return problems


def test_readme_commands_and_options_exist():
    """Every lasad command line in the README (code blocks, the GPU-only and skipped ones too, and
    the prose) names real subcommands and options, every `python benchmarks/NAME.py` command only
    that script's options (its --help), and every `--option` it mentions exists."""
    problems = check_commands(README.read_text())
    assert not problems, "\n".join(problems)


def test_check_commands_finds_drift():
    """The check above on a README with made-up drift: each kind of mistake is found."""
    text = README.read_text()
    assert "--save-individual" in text and "lasad-eval fid --ref" in text
    assert "python benchmarks/engine_bench.py --out bench --llamagen" in text
    bad = (text.replace("--save-individual", "--save-indiv")
           .replace("lasad-eval fid --ref", "lasad-eval fidd --ref")
           .replace("python benchmarks/engine_bench.py --out bench --llamagen",
                    "python benchmarks/engine_bench.py --out bench --llamagenn")
           + "\nSee `lasad-train data subset SRC OUT --label-set subgroup\n--min-cnt 40` and `--no-such-flag`.\n"
           + "Run `python benchmarks/no_such_bench.py --out X`.\n")
    problems = "\n".join(check_commands(bad))
    assert "benchmarks/engine_bench.py has no option --llamagenn" in problems
    assert "benchmarks/no_such_bench.py is not a script with --help" in problems
    assert "lasad-run has no option --save-indiv" in problems
    assert "lasad-eval has no subcommand 'fidd'" in problems
    assert "lasad-train data subset has no option --min-cnt" in problems
    assert "no lasad command has the option --no-such-flag" in problems


def test_readme_paths_exist():
    """Every file or folder of this repository that the README names (docs/, benchmarks/, tests/,
    ...) is there."""
    root = README.parent
    named = re.findall(r"(?<![\w/.-])((?:\.ci|docs|benchmarks|tests|plugins|lasad_engine|lasad_train|tools)/[\w./*-]*\w)",
                       README.read_text())
    assert named
    missing = sorted({p for p in named if not list(root.glob(p))})
    assert not missing, f"README.md names files that are not in the repository: {', '.join(missing)}"


def test_readme_extras_exist():
    """Every `pip install -e ".[a,b]"` extra the README names is one of pyproject.toml's."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    extras = set(tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = {e.strip() for group in re.findall(r"\.\[([a-z0-9_,-]+)\]", README.read_text()) for e in group.split(",")}
    assert named and not named - extras, f"README.md names extras pyproject.toml lacks: {sorted(named - extras)}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block(block, workspace):
    plan = parse_marker(block)
    if plan.mode == "skip":
        pytest.skip(f"README.md line {block.line}: {plan.reason}")
    missing = [CONDITIONS[c][1] for c in plan.conditions if not CONDITIONS[c][0]()]
    if missing:
        pytest.skip(f"README.md line {block.line}: {'; '.join(missing)}")
    code = rewrite(block.code, plan, block.line)
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "README_TEST": __file__,
           "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(RUNNERS[block.lang] + [code], cwd=workspace, env=env, capture_output=True, text=True,
                       timeout=BLOCK_TIMEOUT_S)
    assert r.returncode == 0, (f"README.md line {block.line} exited {r.returncode}\n--- ran (in {workspace}):\n"
                               f"{code}--- stdout (tail):\n{r.stdout[-3000:]}\n--- stderr (tail):\n{r.stderr[-3000:]}")


EMOJI5_STANDIN_CLASSES = 24


def make_emoji5_standin(out: str | os.PathLike) -> dict:
    """A small image set in Emoji-5's layout (lasad-train data): 64x64 pictures, an `identity` label
    set named like the bundled model's first 24 classes, one image per class and a second for the
    first 12 (those hold the held-out split). Each picture is a coloured disc on white."""
    import numpy as np
    from safetensors import safe_open

    from lasad_engine.checkpoint import DEFAULT_CHECKPOINT
    from lasad_train.data import holdout_split, write_image_set

    with safe_open(str(DEFAULT_CHECKPOINT), framework="pt") as f:
        names = json.loads(f.metadata()["config"])["class_names"][:EMOJI5_STANDIN_CLASSES]
    labels = np.concatenate([np.arange(len(names)), np.arange(len(names) // 2)]).astype(np.int64)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    images = np.full((len(labels), 64, 64, 3), 255, dtype=np.uint8)
    for i, c in enumerate(labels):
        colour = np.random.default_rng(int(c)).integers(0, 200, 3)
        cy, cx, r = rng.integers(20, 44), rng.integers(20, 44), rng.integers(10, 20)
        images[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = colour
    return write_image_set(out, images, {"identity": (labels, names)}, holdout_split(labels, 0.1),
                           {"source": "tests/test_readme.py stand-in for Emoji-5"},
                           "Synthetic discs drawn by tests/test_readme.py.\n")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "emoji5":
        sys.exit(f"usage: python {sys.argv[0]} emoji5 OUT")
    manifest = make_emoji5_standin(sys.argv[2])
    print(f"stand-in image set: {manifest['count']} images, {manifest['num_classes']['identity']} classes "
          f"-> {sys.argv[2]}")
