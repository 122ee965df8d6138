# Alternates TLS handshakes to one name (leaf cached) and to N distinct names (each mints a
# leaf); prints the median handshake time of each.
import socket, ssl, statistics, sys, time
ip, n, suffix, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context()
def handshake(name):
    t0 = time.perf_counter()
    with socket.create_connection((ip, 443), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname=name):
            return time.perf_counter() - t0
handshake(f"warm.{suffix}")
deadline = time.monotonic() + 60
same, distinct = [], []
for i in range(n):
    if time.monotonic() > deadline:
        break
    same.append(handshake(f"same.{suffix}"))
    distinct.append(handshake(f"{tag}{i}.{suffix}"))
print("MINT", statistics.median(same) * 1e3, statistics.median(distinct) * 1e3, len(distinct))
