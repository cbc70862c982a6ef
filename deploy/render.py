"""Renders every deployment file from deploy/services.toml.

    .venv/bin/python -m deploy.render           # write them
    .venv/bin/python -m deploy.render --check   # exit 1 if a written file is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deploy import render_compose, render_nomad
from deploy.topology import SOURCE, Topology, load

DEPLOY_DIR = Path(__file__).parent


def rendered_files(topology: Topology) -> dict[str, str]:
    """Path relative to deploy/ -> content, for every rendered file."""
    return {**render_compose.render(topology), **render_nomad.render(topology)}


def stale_files(topology: Topology, root: Path = DEPLOY_DIR) -> list[str]:
    return [
        path for path, content in rendered_files(topology).items()
        if not (root / path).is_file() or (root / path).read_text() != content
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.render", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="only report files that differ from services.toml")
    args = parser.parse_args(argv)
    topology = load(SOURCE)
    if args.check:
        stale = stale_files(topology)
        for path in stale:
            print(f"out of date: deploy/{path} (run: python -m deploy.render)", file=sys.stderr)
        return 1 if stale else 0
    for path, content in rendered_files(topology).items():
        target = DEPLOY_DIR / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        print(f"wrote deploy/{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
