"""Serve's HAProxy ingress: the node environment that turns it on without colliding."""

import socket

import pytest

from flows.local_stack import free_ports
from serving.ingress import ENABLE_ENV, PORT_ENVS, haproxy_binary, haproxy_env


def test_haproxy_env_turns_it_on_with_its_files_in_the_folder_and_free_ports(tmp_path):
    env = haproxy_env(tmp_path / "h", free_ports(len(PORT_ENVS)))
    assert env[ENABLE_ENV] == "1"
    files = [v for k, v in env.items() if k.endswith(("_LOC", "_PATH", "_BASE", "_FILE"))]
    assert len(files) == 5 and all(v.startswith(str(tmp_path / "h")) for v in files)
    assert (tmp_path / "h").is_dir()
    ports = [int(v) for k, v in env.items() if k.endswith("_PORT")]
    assert len(ports) == len(set(ports)) == 4
    for port in ports:  # each one free to bind now
        with socket.socket() as probe:
            probe.bind(("", port))
    again = haproxy_env(tmp_path / "h2", free_ports(len(PORT_ENVS)))  # a second node's own
    assert {k: v for k, v in again.items() if k.endswith("_LOC")} != {
        k: v for k, v in env.items() if k.endswith("_LOC")
    }


def test_the_haproxy_binary_comes_with_ray_serve():
    from pathlib import Path

    assert Path(haproxy_binary()).name == "haproxy" and Path(haproxy_binary()).is_file()


def test_haproxy_env_wants_a_port_for_each_of_its_listeners(tmp_path):
    with pytest.raises(ValueError, match="give 4 ports"):
        haproxy_env(tmp_path, [8404])
