"""`sluicegate bench SCENARIO [flags]` (or `python -m sluicegate.loadtest.bench`): one scenario per README figure.

Each scenario prints a table, writes loadtest/results/<scenario>.json and, with the `plots` extra
installed, may write a PNG under docs/.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sluicegate.loadtest.common import CheckoutRefused
from sluicegate.loadtest.engine_servers import EnginesMissing

SCENARIOS: dict[str, str] = {
    # name: module under loadtest.scenarios (added as they are written)
    "memory": "memory",
    "resume": "resume",
    "ttft": "ttft",
    "throughput": "throughput",
    "fanout": "fanout",
    "streams": "streams",
    "recovery": "recovery",
    "rq_cost": "rq_cost",
    "calls": "calls",
    "decision": "decision",
    "priority": "priority",
    "fairness": "fairness",
    "quota": "quota",
    "cluster": "cluster",
    "soak": "soak",
    "drills": "drills",
    "deadlines": "deadlines",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="sluicegate bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    modules = {}
    for name, module_name in SCENARIOS.items():
        module = importlib.import_module(f"sluicegate.loadtest.scenarios.{module_name}")
        modules[name] = module
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0],
                           description=module.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
    args = parser.parse_args(argv)
    try:
        modules[args.scenario].run(args)
    except (EnginesMissing, CheckoutRefused) as error:  # llamacpp without the engines extra; --against DIR, no .venv
        print(f"sluicegate bench {args.scenario}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
