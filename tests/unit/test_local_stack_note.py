"""A command that trains while the stack of ``ldm up`` runs, from a shell that did not
source its env.sh, is told so: it would join that stack's Ray through Ray's address
file while its data and MLflow runs stay outside the stack."""

from __future__ import annotations

import os
import subprocess
import sys

from flows.local_stack import Service, Stack, stack_folder, unused_stack_note


def _stack(home, pid: int) -> Stack:
    folder = stack_folder(home)
    folder.mkdir(parents=True)
    ray = Service("ray-head", pid, "http://127.0.0.1:8265", str(folder / "ray-head.log"))
    stack = Stack(str(folder), [ray], {"RAY_ADDRESS": "http://127.0.0.1:8265"})
    stack.save()
    return stack


def test_a_running_stack_the_shell_does_not_use_is_named_with_its_env_file(tmp_path):
    assert unused_stack_note(tmp_path, None) is None  # no stack
    _stack(tmp_path, os.getpid())  # a live process stands for the stack's service
    note = unused_stack_note(tmp_path, None)
    assert note is not None and f"source {tmp_path / 'stack' / 'env.sh'}" in note
    assert unused_stack_note(tmp_path, "http://127.0.0.1:8265") is None  # env.sh sourced
    assert unused_stack_note(tmp_path, "ray://elsewhere:10001") is None  # another cluster


def test_a_stopped_stack_says_nothing(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _stack(tmp_path, gone.pid)
    assert unused_stack_note(tmp_path, None) is None
