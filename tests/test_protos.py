"""The generated modules in protos/ match the .proto files, and the Gateway contract holds."""

from __future__ import annotations

import pathlib

from cy_sidecar.protos import cy_llm_pb2 as pb
from cy_sidecar.protos import generate


def test_generated_code_is_in_step_with_the_proto_files(tmp_path):
    written = generate.generate(tmp_path)
    assert written, "protoc wrote nothing"
    for path in written:
        committed = generate.PROTO_DIR / path.name
        assert committed.exists(), f"{committed.name} is not committed"
        assert committed.read_text() == path.read_text(), (
            f"{committed.name} is stale: run `python -m cy_sidecar.protos.generate`"
        )


def _fields(message) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


def test_gateway_contract_field_numbers_are_wire_compatible():
    assert pb.DESCRIPTOR.package == "cy.llm"
    service = pb.DESCRIPTOR.services_by_name["AiInference"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {
        "StreamPredict": (True, True), "Control": (False, False), "Health": (False, False),
    }
    contract = {
        pb.StreamMetadata: dict(trace_id=1, tenant=2, player_id=3, locale=4, extra=5),
        pb.GenerationParameters: dict(max_new_tokens=1, temperature=2, top_p=3,
                                      repetition_penalty=4),
        pb.StreamPredictRequest: dict(model_id=1, prompt=2, adapter=3, priority=4,
                                      generation=5, metadata=6, worker_hint=7),
        pb.StreamPredictResponse: dict(trace_id=1, chunk=2, end_of_stream=3, index=4,
                                       ttft_ms=5, tokens_per_sec=6),
        pb.ControlMessage: dict(trace_id=1, command=2, payload=3),
        pb.WorkerHealthRequest: dict(trace_id=1),
        pb.WorkerHealthResponse: dict(healthy=1, metrics=2),
    }
    for message, fields in contract.items():
        actual = _fields(message)
        for name, number in fields.items():
            assert actual[name] == number, f"{message.__name__}.{name}"
        # Extensions only at new numbers, never reusing the contract's.
        extra = {n for k, n in actual.items() if k not in fields}
        assert not extra & set(fields.values())


def test_proto_sources_ship_with_the_package():
    names = {p.name for p in pathlib.Path(generate.PROTO_DIR).glob("*.proto")}
    assert names == set(generate.PROTO_FILES)
