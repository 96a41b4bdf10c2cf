"""Regenerate the Python modules of protos/ from the .proto files.

Run `python -m cy_sidecar.protos.generate` after editing a .proto file; a test compares the
committed modules with a fresh generation and fails when they drift apart.

The files are compiled under the virtual path cy_sidecar/protos/ so that the generated imports
read `from cy_sidecar.protos import ...` and work from an installed package.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

PROTO_DIR = pathlib.Path(__file__).resolve().parent
PROTO_FILES = ("cy_llm.proto", "usage.proto")


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Compile every .proto into out_dir; returns the files written."""
    from grpc_tools import protoc  # imported here: grpcio-tools is a development dependency

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"--proto_path=cy_sidecar/protos={PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
        ] + [f"cy_sidecar/protos/{name}" for name in PROTO_FILES]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {PROTO_FILES}")
        written = []
        for path in sorted((pathlib.Path(tmp) / "cy_sidecar" / "protos").iterdir()):
            target = out_dir / path.name
            shutil.copyfile(path, target)
            written.append(target)
        return written


if __name__ == "__main__":
    for path in generate(PROTO_DIR):
        print(f"wrote {path}", file=sys.stderr)
