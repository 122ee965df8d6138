"""An unmodified client for Robin's capture tests: plain sockets, no proxy settings.

  workload.py connect {4|6|mapped} HOST PORT   -> {"peer": [host, port], "reply": "..."}
  workload.py udp HOST PORT                    -> {"reply": "..."}
  workload.py burst CONCURRENCY TOTAL HOST:PORT...
        -> {"ok": n, "mismatch": n, "errors": n, "first_problem": "..."}
  workload.py hold-then-connect HOST PORT
        -> {"first": "...", "second": "..." | null, "second_error": "EPERM" | null}
        (the first connection stays open while the second is dialled)
Each captured connection is answered "robin <orig-dst>", a direct one "direct".
"""
import asyncio
import errno
import json
import socket
import sys

TIMEOUT = 5.0


def read_line(sock):
    data = b""
    while not data.endswith(b"\n") and len(data) < 4096:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def connect(family, host, port):
    if family == "4":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (host, port)
    else:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        if family == "mapped":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            host = "::ffff:" + host
        target = (host, port)
    sock.settimeout(TIMEOUT)
    sock.connect(target)
    peer = sock.getpeername()[:2]
    try:
        reply = read_line(sock)
    except ConnectionResetError:
        reply = ""
    sock.close()
    return {"peer": [peer[0], peer[1]], "reply": reply}


def udp(host, port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(TIMEOUT)
    sock.connect((host, port))
    sock.send(b"ping")
    return {"reply": sock.recv(100).decode().strip()}


def hold_then_connect(host, port):
    first = socket.create_connection((host, port), TIMEOUT)
    out = {"first": read_line(first), "second": None, "second_error": None}
    try:
        second = socket.create_connection((host, port), TIMEOUT)
        out["second"] = read_line(second)
        second.close()
    except OSError as e:
        out["second_error"] = errno.errorcode.get(e.errno, str(e))
    first.close()
    return out


async def one(target, results):
    host, port = target.rsplit(":", 1)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), TIMEOUT)
        line = (await asyncio.wait_for(reader.readline(), TIMEOUT)).decode().strip()
        writer.close()
        if line == "robin " + target:
            results["ok"] += 1
        else:
            results["mismatch"] += 1
            results.setdefault("first_problem", f"{target} answered {line!r}")
    except Exception as e:  # noqa: BLE001 - every failure is counted and reported
        results["errors"] += 1
        results.setdefault("first_problem", f"{target}: {e!r}")


async def burst(concurrency, total, targets):
    results = {"ok": 0, "mismatch": 0, "errors": 0}
    sem = asyncio.Semaphore(concurrency)

    async def guarded(i):
        async with sem:
            await one(targets[i % len(targets)], results)

    await asyncio.gather(*(guarded(i) for i in range(total)))
    return results


def main():
    cmd = sys.argv[1]
    if cmd == "connect":
        out = connect(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif cmd == "udp":
        out = udp(sys.argv[2], int(sys.argv[3]))
    elif cmd == "hold-then-connect":
        out = hold_then_connect(sys.argv[2], int(sys.argv[3]))
    elif cmd == "burst":
        out = asyncio.run(burst(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]))
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
