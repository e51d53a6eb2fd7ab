"""Regenerate the Python modules of ``inference.proto`` (needs ``grpcio-tools``, a test extra).

    python -m service.protocols.oip_grpc.generate

runs ``python -m grpc_tools.protoc -I <repo root> --python_out --pyi_out --grpc_python_out`` on
``service/protocols/oip_grpc/inference.proto`` and writes ``inference_pb2.py``,
``inference_pb2.pyi`` and ``inference_pb2_grpc.py`` next to it, with one change to the generated
code: the messages are registered in a private descriptor pool (``inference_pb2.POOL``) instead
of protobuf's default pool. Their names are the protocol's (``inference.ModelInferRequest``), and
``tritonclient.grpc``, which a user's process or our tests import next to the server, registers
the same names from Triton's files in the default pool; protobuf refuses one name twice in a
pool, and the wire format does not carry the names at all.

The generated code must run on a protobuf runtime at least as new as the protoc that wrote it
(the header of ``inference_pb2.py`` names it); ``pyproject.toml`` pins that floor.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
PROTO = HERE / "inference.proto"
OUTPUTS = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")

_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_SYM_DB = "_sym_db = _symbol_database.Default()\n"


def protoc_command(out_dir: Path) -> list[str]:
    rel = PROTO.relative_to(ROOT).as_posix()
    return [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        rel,
    ]


def private_pool(source: str) -> str:
    """The generated ``_pb2`` module, registering its file in a pool of its own."""
    if source.count(_DEFAULT_POOL) != 1 or _SYM_DB not in source:
        raise RuntimeError("protoc's output changed shape; update generate.private_pool")
    source = source.replace(_DEFAULT_POOL, "POOL.AddSerializedFile(")
    return source.replace(
        _SYM_DB,
        _SYM_DB + "# Not the default pool: see service/protocols/oip_grpc/generate.py.\n"
        "POOL = _descriptor_pool.DescriptorPool()\n",
    )


def generate(out_dir: Path = HERE) -> list[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(protoc_command(Path(tmp)), check=True, cwd=ROOT)
        generated = Path(tmp) / PROTO.parent.relative_to(ROOT)
        written = []
        for name in OUTPUTS:
            text = (generated / name).read_text()
            if name == "inference_pb2.py":
                text = private_pool(text)
            target = out_dir / name
            target.write_text(text)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT))
