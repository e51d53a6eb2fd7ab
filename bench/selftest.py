"""``python -m bench.selftest``: what the load generator itself costs, against a do-nothing server.

A trivial HTTP/1.1 server (asyncio protocol, fixed 2-byte answer) runs in a child process on
loopback; the generator drives it closed-loop and open-loop. The client CPU per request and the
rate it reaches are the generator's own ceiling, i.e. how far it is from being the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

from bench import loadgen
from bench.server import free_port

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class _Trivial(asyncio.Protocol):
    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self.buf[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            self.transport.write(ANSWER)


async def _serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Trivial, "127.0.0.1", port)
    await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.selftest", description=__doc__)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the child's role
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--rate", type=float, default=3000.0, help="open-loop rate")
    p.add_argument("--body-bytes", type=int, default=300)
    args = p.parse_args(argv)
    if args.serve:
        loadgen.run(_serve(args.serve))
        return 0

    port = free_port()
    child = subprocess.Popen([sys.executable, "-m", "bench.selftest", "--serve", str(port)])
    try:
        target = loadgen.Target("127.0.0.1", port, "/", (b"x" * args.body_bytes,))
        deadline = time.monotonic() + 10
        while (
            loadgen.run(
                loadgen.closed_loop(
                    target, concurrency=1, duration_s=1, max_requests=1, timeout_s=1
                )
            ).ok
            == 0
        ):
            if time.monotonic() > deadline or child.poll() is not None:
                print("trivial server did not start", file=sys.stderr)
                return 1
            time.sleep(0.1)
        print("load          req/s   client CPU us/req   p50 ms   p99 ms   late sends")
        runs = [
            (f"closed c={c}", loadgen.closed_loop(target, concurrency=c, duration_s=args.duration))
            for c in (1, 8, 32)
        ]
        runs.append(
            (
                f"open {args.rate:.0f}/s",
                loadgen.open_loop(target, rate=args.rate, duration_s=args.duration),
            )
        )
        for name, coro in runs:
            s = loadgen.run(coro).summary()
            print(
                f"{name:<12} {s['req_per_s']:>7.0f}   {s['client_cpu_us_per_req']:>17.1f}   "
                f"{s['p50_ms']:>6.2f}   {s['p99_ms']:>6.2f}   {s['late_sends']:>10}"
            )
    finally:
        child.terminate()
        child.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
