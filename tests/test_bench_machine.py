"""A benchmark result names the host closely enough to tell two hosts of one CPU name apart."""

from __future__ import annotations

from sluicegate.loadtest.common import cpu_identity, describe_cpu

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
stepping\t: 1

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9B14
stepping\t: 0
"""


def test_the_first_processors_family_model_and_stepping_are_kept() -> None:
    identity = cpu_identity(CPUINFO, "1024K")
    assert identity == {"cpu": "AMD EPYC", "cpu_family": 26, "cpu_model": 2, "cpu_stepping": 1,
                        "l2_per_core": "1024K"}
    assert describe_cpu(identity) == "AMD EPYC (family 26, model 2, L2 1024K a core)"


def test_a_cpu_without_those_fields_is_named_alone() -> None:
    identity = cpu_identity("processor\t: 0\nmodel name\t: Neoverse-V2\n")
    assert identity == {"cpu": "Neoverse-V2"}
    assert describe_cpu(identity) == "Neoverse-V2"
