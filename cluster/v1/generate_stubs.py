"""Regenerate the Python stubs of protos/cluster/v1 (``make protos``; the tests check they are current).

The proto package is ``cluster.v1`` and the stubs are written into this package, so the
generated ``from cluster.v1 import ...`` lines import from here and Ray Serve's gRPC proxy can
import the servicer functions by dotted path.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_ROOT = os.path.join(REPO, "protos")


def proto_files() -> list[str]:
    return sorted(glob.glob(os.path.join(PROTO_ROOT, "cluster", "v1", "*.proto")))


def generate(out_dir: str) -> list[str]:
    """Run protoc into ``out_dir`` (a repo-root-like folder); return the generated file paths."""
    from grpc_tools import protoc

    files = [os.path.relpath(p, PROTO_ROOT) for p in proto_files()]
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *files]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(glob.glob(os.path.join(out_dir, "cluster", "v1", "*_pb2*.py*")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=REPO, help="folder to write cluster/v1/*_pb2*.py into")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(os.path.relpath(path, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
