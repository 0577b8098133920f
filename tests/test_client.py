"""The client package: its CLI against a real server, and its install footprint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "edgevlm_client.cli"]


def test_cli_chat_keeps_the_conversation(server, tmp_path):
    from edgevlm.samples import sample_image
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(sample_image("chelsea"))
    r = subprocess.run(CLI + ["--url", server.grpc_url, "chat", "--image", str(photo), "--max-tokens", "6"],
                       input="What is in the image?\nAnd its colour?\n\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    answers = [line for line in r.stdout.splitlines() if line.startswith("vlm> ")]
    assert len(answers) == 2 and all(len(a) > len("vlm> ") for a in answers)


def test_cli_ask_reports_errors_as_one_line_and_exit_2(server):
    r = subprocess.run(CLI + ["--url", server.grpc_url, "ask", "--image", "/nonexistent.jpg", "Hi"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "InvalidRequest: cannot read image /nonexistent.jpg" in r.stderr


@pytest.mark.skipif(os.environ.get("EDGEVLM_SKIP_INSTALL_TEST") == "1", reason="install test disabled")
def test_client_installs_alone_without_torch_or_onnxruntime(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    pip = env_dir / "bin" / "pip"
    # from a copy: setuptools leaves build/ and *.egg-info beside the sources it builds
    src = shutil.copytree(ROOT / "client", tmp_path / "client",
                          ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    r = subprocess.run([str(pip), "install", "-q", str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    installed = subprocess.run([str(pip), "list", "--format=freeze"], capture_output=True, text=True).stdout.lower()
    assert "edgevlm-client" in installed and "tritonclient" in installed
    assert "torch" not in installed and "onnxruntime" not in installed
    r = subprocess.run([str(env_dir / "bin" / "edgevlm-client"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "ask" in r.stdout
