"""Calibration: the same generator against a null HTTP server in another process, at the same
rates. What it reports there is the generator's own floor (what a server costing ~0 would get).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

from benchmarks.serving import ROOT
from benchmarks.serving.loadgen import run_loadgen
from benchmarks.serving.server import free_port


def null_server(port: int) -> None:
    """A minimal HTTP/1.1 keep-alive server answering 200 with a small JSON body; ~0 work."""
    body = b'{"status":"ok"}'
    response = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    class Proto(asyncio.Protocol):
        def connection_made(self, transport):
            self.t = transport
            self.buf = b""

        def data_received(self, data):
            self.buf += data
            while b"\r\n\r\n" in self.buf:
                _, self.buf = self.buf.split(b"\r\n\r\n", 1)
                self.t.write(response)

    async def main():
        server = await asyncio.get_running_loop().create_server(Proto, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def calibrate(rates: list[float], duration: float, connections: int) -> list[dict]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.serving.calibrate", str(port)], cwd=ROOT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.1)
        rows = []
        for rate in rates:
            spec = {
                "base": f"http://127.0.0.1:{port}", "rate": rate, "warmup": 1.0, "duration": duration,
                "timeout": 5.0, "connections": connections, "mix": False,
            }  # fmt: skip
            res = run_loadgen(spec)
            rows.append(res)
            print(
                f"  null server @ {rate:>6.0f} rps: p50 {res.get('p50_ms')} ms  p99 {res.get('p99_ms')} ms  "
                f"max {res.get('max_ms')} ms  generator cpu {res['generator_cpu_fraction']:.0%}",
                flush=True,
            )
        return rows
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


if __name__ == "__main__":
    null_server(int(sys.argv[1]))
