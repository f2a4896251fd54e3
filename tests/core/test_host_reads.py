"""The host-read counter behind ``make syncs``: what it counts, and what it knows is free.

The counter stands in for a GPU's device-to-host synchronisations on a CPU-only machine, so it must
count every call that reads a device tensor's value back to Python, and must not count reads of
tensors that a GPU run would hold in host memory anyway.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import host_reads as H  # noqa: E402

ROOTS = (str(Path(__file__).resolve().parent) + os.sep,)


def _device_tensor() -> torch.Tensor:
    """A tensor the counter treats as on the compute device (created before counting, like a weight)."""
    return torch.arange(6, dtype=torch.float32) - 2.0


def test_each_kind_of_host_read_counts_once_at_its_line():
    x = _device_tensor()
    with H.HostReadCounter(ROOTS) as c:
        x.max().item()
        bool((x > 0).any())
        float(x.sum())
        x.tolist()
        torch.equal(x, x)
        (x > 0).nonzero()
        x[x > 0]
        x.to("cpu", copy=True)
    assert c.pack == 8 and c.host == 0
    assert all(site.startswith("core/test_host_reads.py:") for site in c.sites)
    assert len(c.sites) == 8  # one line each


def test_device_side_work_is_not_a_read():
    x = _device_tensor()
    with H.HostReadCounter(ROOTS) as c:
        y = torch.where(x > 0, x, torch.zeros_like(x)).cumsum(0)
        y[1:3] = 0.0
        torch.nonzero_static(x > 0, size=3)
        x.to(x.device)  # a move to the compute device
        _ = x.shape[0], x.numel()
    assert c.pack == 0


def test_tensors_on_the_host_are_free_to_read_until_moved_back():
    x = _device_tensor()
    with H.HostReadCounter(ROOTS) as c:
        host = x.cpu()  # one read: the transfer
        float(host[0])
        host.tolist()
        bool((host.double() * 2 > 1).all())  # derived only from host tensors: still on the host
        made_here = torch.ones(3)  # a factory without a device makes a host tensor
        made_here.sum().item()
        back = host.to(torch.device("cpu"))  # a torch.device is the compute device: a copy goes there
        back.sum().item()  # so reading it again is a read
        assert host is not back
    assert c.pack == 2


def test_reads_inside_other_code_are_the_hosts():
    x = _device_tensor()
    with H.HostReadCounter(("/nowhere" + os.sep,)) as c:
        x.sum().item()
    assert c.pack == 0 and c.host == 1
