"""A quantization check's stages run in processes of their own (export/isolated.py): what a
stage leaves in memory goes with it, and a stage that dies says so."""

from __future__ import annotations

import os

import numpy as np
import pytest

from edgevlm.export.isolated import run_isolated


def test_a_stage_runs_in_another_process_and_its_answer_comes_back():
    assert run_isolated(os.getpid) != os.getpid()
    assert run_isolated(np.arange, 5).tolist() == [0, 1, 2, 3, 4]


def test_a_stage_that_raises_raises_here():
    with pytest.raises(ValueError, match="invalid literal"):
        run_isolated(int, "not a number")


def test_a_stage_killed_before_it_answers_is_named_and_the_next_one_runs():
    # what the OOM killer does to a form too big for the machine: a one-line reason, not a hang
    with pytest.raises(RuntimeError, match="_exit was killed before it answered"):
        run_isolated(os._exit, 9)
    assert run_isolated(os.getpid) != os.getpid()
