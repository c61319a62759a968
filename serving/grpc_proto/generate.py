"""Regenerate `grpc_predict_v2_pb2.py` from `grpc_predict_v2.proto` (build time only).

Run it with `grpcio-tools==1.74.*` in a scratch venv: its gencode (protobuf 6.31.1) loads on
any protobuf runtime >= 6.31.1, 7.x included, while `tritonclient[grpc]` (the test client)
needs protobuf < 7; a newer grpcio-tools would demand a runtime no test setup can have.

The generated module is then moved into a private descriptor pool: the messages keep their
wire names (`inference.*`, so Triton and KServe clients talk to the server unchanged) without
clashing with `tritonclient.grpc`'s own copy of the same protocol in the default pool when
both are imported in one process. No `_pb2_grpc` module is generated: the service handlers
are registered with `grpc.method_handlers_generic_handler` in `serving/grpc_service.py`.
"""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRIVATE_POOL = "_descriptor_pool.DescriptorPool()"


def main() -> None:
    from grpc_tools import protoc

    code = protoc.main(["protoc", f"-I{HERE}", f"--python_out={HERE}", str(HERE / "grpc_predict_v2.proto")])
    if code:
        raise SystemExit(f"protoc failed with exit code {code}")
    module = HERE / "grpc_predict_v2_pb2.py"
    text, count = re.subn(r"_descriptor_pool\.Default\(\)", PRIVATE_POOL, module.read_text())
    if count != 1:
        raise SystemExit(f"expected one default descriptor pool in {module}, found {count}")
    module.write_text(text)


if __name__ == "__main__":
    main()
