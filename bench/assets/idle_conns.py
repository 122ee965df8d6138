# Opens N TLS connections through Robin, holds them, then sends one request on each; prints
# the kernel memory of Robin's eBPF maps, and Robin's RSS (ROBIN_PID) idle, after the
# handshakes, 1 s after the requests, and 11 s after them (connections still held: past Robin's
# periodic heap trim, checked every 5 s).
import os, socket, ssl, sys, time
n, host, ip = int(sys.argv[1]), sys.argv[2], sys.argv[3]
robin = os.environ["ROBIN_PID"]
def rss():
    with open(f"/proc/{robin}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
def bpf_map_kib():
    # Kernel memory of the eBPF maps Robin holds (`memlock` of each map descriptor): not RSS,
    # but charged to Robin's memory cgroup all the same.
    total, fds = 0, f"/proc/{robin}/fdinfo"
    for fd in os.listdir(fds):
        try:
            with open(f"{fds}/{fd}") as f:
                info = dict(l.split(":", 1) for l in f if ":" in l)
        except OSError:
            continue
        if "map_type" in info:
            total += int(info["memlock"])
    return total // 1024
time.sleep(0.5)
print("IDLE_RSS", rss(), flush=True)
print("BPF_MAPS", bpf_map_kib(), flush=True)
ctx = ssl.create_default_context()
conns, deadline = [], time.monotonic() + 60
for i in range(n):
    if time.monotonic() > deadline:
        break
    s = socket.create_connection((ip, 443), timeout=10)
    conns.append(ctx.wrap_socket(s, server_hostname=host))
time.sleep(1)
hs = rss()
for t in conns:
    t.sendall(f"GET /small HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
for t in conns:
    buf = b""
    while not buf.endswith(b"ok\n") and time.monotonic() < deadline + 30:
        chunk = t.recv(4096)
        if not chunk:
            raise SystemExit("connection closed")
        buf += chunk
time.sleep(1)
after = rss()
time.sleep(10)
print("CONNS_RSS", len(conns), hs, after, rss(), flush=True)
