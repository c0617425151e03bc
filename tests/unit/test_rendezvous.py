"""Rendezvous address and gloo interface from the allocation (cratescale/distributed/rendezvous.py); the
multi-node cases run in tests/slurm/test_multinode.py."""
from __future__ import annotations

import pytest

from cratescale.distributed import rendezvous
from cratescale.distributed.world import world_from_env


def test_a_name_that_resolves_is_kept():
    assert rendezvous.master_address("localhost") == "localhost"


def test_a_name_that_resolves_nowhere_is_one_line_naming_it(monkeypatch):
    monkeypatch.setattr(rendezvous, "node_addr", lambda node: None)   # SLURM does not know it either
    with pytest.raises(rendezvous.RendezvousError, match=r"node 'no-such-node-x7' .* set MASTER_ADDR") as err:
        rendezvous.master_address("no-such-node-x7")
    assert "\n" not in str(err.value)


def test_slurm_node_addr_is_used_when_the_name_does_not_resolve(monkeypatch):
    monkeypatch.setattr(rendezvous, "node_addr", lambda node: "127.0.0.1" if node == "gpu-a17" else None)
    assert rendezvous.master_address("gpu-a17") == "127.0.0.1"
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "gpu-a17"}
    assert world_from_env(env).master_addr == "127.0.0.1"


def test_gloo_binds_the_interface_toward_the_master(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    assert rendezvous.interface_toward("127.0.0.1") == "lo"
    assert rendezvous.bind_gloo_to_master_route(0, "127.0.0.1", 29500) == "lo"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")   # the profile's choice wins
    assert rendezvous.bind_gloo_to_master_route(0, "127.0.0.1", 29500) == "ib0"
