"""`cy-sidecar demo`: the whole product on loopback in one command.

It starts a usage sink, the demo inference worker and the sidecar with two proxy processes
on free local ports in a temporary directory, streams one prompt through the Gateway API
as a Gateway would, prints the text as it arrives, then waits until the sink has
acknowledged the request's usage record and prints it. Everything is stopped at the end;
the logs of all three programs stay in the temporary directory for a look.
"""

from __future__ import annotations

import shutil
import sys
import time

from cy_sidecar.localrun import Stack, StackError


class DemoError(RuntimeError):
    pass


def run_demo(procs: int = 2, prompt: str = "", tokens: int = 60) -> int:
    import grpc
    from rich.console import Console

    from cy_sidecar.protos import cy_llm_pb2 as pb
    from cy_sidecar.protos import cy_llm_pb2_grpc as pb_grpc

    console = Console(highlight=False, soft_wrap=True)
    stack = Stack.create()
    stack.log_path = f"{stack.root}/demo.log"
    stack.write_config(**{"metering.batch_interval_secs": 0.5})
    ok = False
    try:
        console.print(f"[bold]cy-sidecar demo[/] in {stack.root}")
        stack.start_sink()
        console.print(f"  usage sink     listening on 127.0.0.1:{stack.sink_port}")
        stack.start_worker("--tokens-per-sec", "25", "--ttft-ms", "200")
        console.print(f"  demo worker    pid {stack.worker.pid} on {stack.worker_path}")
        stack.start_sidecar(procs=procs)
        console.print(
            f"  sidecar        {procs} proxy processes on {stack.target}, metrics on "
            f"http://127.0.0.1:{stack.metrics_port}/metrics"
        )
        console.print(f"\n[bold]prompt:[/] {prompt}\n[bold]reply:[/]  ", end="")

        request = pb.StreamPredictRequest(
            model_id="demo", prompt=prompt,
            generation=pb.GenerationParameters(max_new_tokens=tokens, temperature=0.7),
            metadata=pb.StreamMetadata(trace_id="demo-trace-1", tenant="demo-tenant"),
        )
        usage = None
        with grpc.insecure_channel(stack.target) as channel:
            stub = pb_grpc.AiInferenceStub(channel)
            for msg in stub.StreamPredict(iter([request]), timeout=60):
                if msg.is_system:
                    console.print(f"[dim]({msg.chunk})[/] ", end="")
                elif msg.end_of_stream:
                    usage = msg.usage
                else:
                    sys.stdout.write(msg.chunk)
                    sys.stdout.flush()
        print()
        if usage is None:
            raise DemoError("the stream ended without a final message")
        console.print(
            f"\n[bold]metered:[/] record {usage.record_id} status={usage.status} "
            f"prompt={usage.prompt_tokens} generated={usage.generated_tokens} "
            f"delivered={usage.delivered_tokens}"
        )
        console.print("[bold]waiting for the usage sink to acknowledge it...[/]")
        deadline = time.monotonic() + 30
        record = None
        while record is None and time.monotonic() < deadline:
            for rec in stack.sink.json_lines("accepted"):
                if rec.get("record_id") == usage.record_id:
                    record = rec
            if record is None:
                stack.sink.wait_for(usage.record_id, timeout=max(0.1, deadline - time.monotonic()))
        console.print("[bold]acknowledged by the sink:[/]")
        console.print_json(data=record)
        ok = True
    except (StackError, grpc.RpcError) as exc:
        detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
        raise DemoError(f"{detail}\n(logs: {stack.log_path})") from None
    finally:
        code = stack.sidecar.stop() if stack.sidecar else 0
        stack.stop()
        if ok:
            console.print(f"\nsidecar exited with code {code}; all stopped.")
            shutil.rmtree(stack.root, ignore_errors=True)
    return 0 if ok and code == 0 else 1
