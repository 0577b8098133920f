"""The Orin walkthrough (docs/ORIN.md, and the README's short version), read the way a new
Orin owner pastes it: every command in their code blocks must exist on a stock JetPack
(Ubuntu 22.04 / 24.04) and do what it says."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands() -> list[str]:
    """Each command of the shell code blocks (```bash / ```sh), continuation lines joined."""
    out, lang = [], None
    text = "\n".join((ROOT / name).read_text() for name in ("docs/ORIN.md", "README.md"))
    for line in text.replace("\\\n", " ").splitlines():
        if line.startswith("```"):
            lang = None if lang is not None else (line[3:].strip() or "text")
            continue
        if lang in ("bash", "sh"):
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def test_the_walkthrough_is_there():
    cmds = commands()
    assert any("make jetson-doctor" in c for c in cmds) and any("edgevlm.jetson.power --set" in c for c in cmds)


def test_no_bare_python_stock_ubuntu_has_only_python3():
    bad = [c for c in commands() if re.search(r"(^|[\s;&|(])python(\s|$)", c)]
    assert bad == [], bad


def test_power_modes_are_set_by_name_never_by_a_module_specific_number():
    bad = [c for c in commands() if re.search(r"nvpmodel\s+-m\s+\d", c)]
    assert bad == [], bad


def test_the_make_targets_and_files_it_names_exist():
    makefile = (ROOT / "Makefile").read_text()
    for c in commands():
        words = c.split()
        if words and words[0] in ("make", "sudo") and "make" in words[:2]:
            target = words[words.index("make") + 1]
            if "=" not in target:
                assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no make target {target!r}: {c}"
        for path in re.findall(r"(?:jetson|build|tools)/[\w./-]+\.(?:py|yaml|service)", c):
            assert (ROOT / path).is_file(), f"{path} does not exist: {c}"
    assert "EnvironmentFile=/etc/default/edgevlm" in (ROOT / "jetson" / "edgevlm.service").read_text()
