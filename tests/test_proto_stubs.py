"""The checked-in stubs are exactly what grpc_tools.protoc generates from the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[1] / "proto"


def test_generated_stubs_match_the_proto(tmp_path):
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("*/*.proto"))
    assert protos, "no .proto under proto/"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos],
        check=True, cwd=PROTO_ROOT)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated
    for rel in generated:
        checked_in = PROTO_ROOT / rel
        assert checked_in.is_file(), f"{rel} is generated but not checked in: run `make proto`"
        assert checked_in.read_bytes() == (tmp_path / rel).read_bytes(), (
            f"proto/{rel} differs from what protoc generates: run `make proto`")
