#!/usr/bin/env python3
"""Load benchmark for hispd (issue 9). Everything on loopback; needs root (for
Postfix) and Debian's postfix package (smtp-source, smtp-sink, postfix).

Runs, with Postfix's smtp-source as the generator and smtp-sink as the sink:
  (a) Postfix itself as a plain relay source -> Postfix -> sink (the baseline:
      an MTA without any S/MIME work);
  (b) source -> hispd submission (trusted network, no AUTH) -> discovery,
      sealing -> delivery to the sink;
  (c) source -> hispd A -> hispd B (decrypt, verify, mailbox), a full round
      trip.
Reports messages/s, p50/p99 latency from acceptance to final acceptance
(sink, or B's mailbox), CPU seconds per message of the MTA processes, peak
RSS, and `openssl speed rsa2048` from the same run (the cryptographic floor).

    cargo build --release
    sudo python3 bench/load.py --mode b --size 5120 --count 500 --concurrency 4
    sudo python3 bench/load.py --matrix            # the table in docs/PERFORMANCE.md
    sudo python3 bench/load.py --large             # 10 MB and 100 MB: peak RSS
"""
import argparse, json, os, re, shutil, socket, subprocess, sys, tempfile, time
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# HISPD_BIN: another build to measure (A/B comparisons in one session).
HISPD = os.environ.get("HISPD_BIN") or os.path.join(ROOT, "target", "release", "hispd")
SBIN = "/usr/sbin"


def tool(name):
    for d in [SBIN, "/usr/bin"]:
        p = os.path.join(d, name)
        if os.path.exists(p):
            return p
    sys.exit(f"{name} not found: apt-get install postfix")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def run(*args, stdin=None):
    r = subprocess.run([HISPD, *args], input=stdin, capture_output=True)
    if r.returncode != 0:
        sys.exit(f"hispd {' '.join(args)}: {r.stderr.decode()}")
    return r.stdout


def wait_port(port, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {port}")


def proc_stats(pid, children=False):
    """CPU seconds (with reaped children's when asked) and peak RSS of pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0
    tick = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / tick
    if children:
        cpu += (int(fields[13]) + int(fields[14])) / tick
    rss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return cpu, rss


def descendants(pid):
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == pid:
            out.append(int(p))
            out.extend(descendants(int(p)))
    return out


def tree_stats(pid):
    """CPU of a process tree (live processes plus the reaped children the
    root and its children waited for) and the sum of their peak RSS."""
    cpu, rss = proc_stats(pid, children=True)
    for c in descendants(pid):
        c_cpu, c_rss = proc_stats(c, children=True)
        cpu += c_cpu
        rss += c_rss
    return cpu, rss


def rsa_floor():
    out = subprocess.run(["openssl", "speed", "-seconds", "2", "rsa2048"], capture_output=True, text=True).stdout
    signs = next((float(l.split()[5]) for l in out.splitlines() if l.startswith("rsa 2048 bits")), 0.0)
    return 1.0 / signs if signs else None


def node(root, domain, mx, sub, delivery, max_size):
    d = os.path.join(root, domain)
    os.makedirs(d)
    with open(os.path.join(d, "hispd.toml"), "w") as f:
        f.write(f"""[server]
hostname = "mx.{domain}"
data_dir = "data"
mx_listen = "127.0.0.1:{mx}"
submission_listen = "127.0.0.1:{sub}"
imap_listen = ""
pop3_listen = ""
log_format = "json"
max_message_size = {max_size}
submission_trusted_networks = ["127.0.0.1"]

[pull]
listen = ""

[delivery]
smart_host = "127.0.0.1:{delivery}"
retry_base_secs = 1

[discovery]
sources = ["local", "public"]

[notify]
mdn_timeout_secs = 86400

[[domains]]
name = "{domain}"
""")
    return d


def hisp_pair(root, a_delivery, ports, max_size):
    da = node(root, "a.example", ports["amx"], ports["asub"], a_delivery, max_size)
    db = node(root, "b.example", ports["bmx"], ports["bsub"], ports["amx"], max_size)
    for d, dom in [(da, "a.example"), (db, "b.example")]:
        run("certs", "new-ca", "--out", os.path.join(root, f"ca-{dom}"))
        run("certs", "issue", "--ca", os.path.join(root, f"ca-{dom}"), "--domain", dom, "--out", os.path.join(d, "certs", dom, "private"))
    for d, dom, other in [(da, "a.example", "b.example"), (db, "b.example", "a.example")]:
        os.makedirs(os.path.join(d, "certs", dom, "anchors", "both"))
        shutil.copy(os.path.join(root, f"ca-{other}", "cert.pem"), os.path.join(d, "certs", dom, "anchors", "both", "other.pem"))
        os.makedirs(os.path.join(d, "certs", "public"))
        shutil.copy(os.path.join(root, other, "certs", other, "private", "cert.pem"), os.path.join(d, "certs", "public", "peer.pem"))
    return da, db


def postfix_relay(root, port, sink_port):
    """A private Postfix instance relaying everything from loopback to the sink."""
    conf = os.path.join(root, "postfix")
    os.makedirs(conf)
    with open("/etc/postfix/master.cf") as f:
        master = []
        for line in f:
            fields = line.split()
            if line[:1] not in ("#", " ", "\t", "\n") and len(fields) >= 8:
                if fields[0] == "smtp" and fields[1] == "inet":
                    fields[0] = f"127.0.0.1:{port}"
                if fields[0].endswith("submission") or fields[0].endswith("smtps"):
                    continue
                fields[4] = "n"  # no chroot: the instance lives in a temp dir
                line = " ".join(fields) + "\n"
            master.append(line)
    with open(os.path.join(conf, "master.cf"), "w") as f:
        f.writelines(master)
    with open(os.path.join(conf, "main.cf"), "w") as f:
        f.write(f"""compatibility_level = 3.6
queue_directory = {root}/postfix-queue
data_directory = {root}/postfix-data
maillog_file = {root}/postfix.log
maillog_file_prefixes = {root}
mail_owner = postfix
setgid_group = postdrop
myhostname = relay.bench.test
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{sink_port}
smtp_tls_security_level = none
smtpd_tls_security_level = none
smtp_address_preference = ipv4
alias_maps =
alias_database =
local_recipient_maps =
message_size_limit = 209715200
default_process_limit = 100
default_destination_concurrency_limit = 20
""")
    for d in ["postfix-queue", "postfix-data"]:
        os.makedirs(os.path.join(root, d))
    env = {**os.environ, "MAIL_CONFIG": conf}
    subprocess.run([os.path.join(SBIN, "postfix"), "-c", conf, "set-permissions"], env=env, capture_output=True)
    subprocess.run([os.path.join(SBIN, "postfix"), "-c", conf, "check"], env=env, check=True)
    p = subprocess.Popen([os.path.join(SBIN, "postfix"), "-c", conf, "start-fg"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, conf


def stop_postfix(root, conf):
    """Stops the private Postfix: its master outlives the start-fg wrapper
    that the run terminates, and would keep its port and processes."""
    env = {**os.environ, "MAIL_CONFIG": conf}
    try:
        subprocess.run([os.path.join(SBIN, "postfix"), "-c", conf, "stop"], env=env,
                       capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        with open(os.path.join(root, "postfix-queue", "pid", "master.pid")) as f:
            os.kill(int(f.read().split()[0]), 9)
    except (OSError, ValueError, IndexError):
        pass  # stopped (its pid file is gone) or never started


def latencies_postfix(log):
    out = []
    with open(log) as f:
        for line in f:
            if "status=sent" in line:
                m = re.search(r"delay=([0-9.]+)", line)
                if m:
                    out.append(float(m.group(1)))
    return out


def ts(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def json_lines(path):
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except ValueError:
                continue


def latencies_hispd(a_log, b_log=None):
    """Acceptance at A to the sink's 250 (b) or B's mailbox (c)."""
    accepted, by_mid = {}, {}
    for e in json_lines(a_log):
        f = e.get("fields", {})
        if f.get("message") == "accepted for delivery":
            accepted[f.get("job")] = ts(e["timestamp"])
            by_mid[f.get("message_id")] = ts(e["timestamp"])
    out = []
    if b_log is None:
        for e in json_lines(a_log):
            f = e.get("fields", {})
            if f.get("message") == "delivery attempt" and f.get("outcome") == "completed" and f.get("job") in accepted:
                out.append(ts(e["timestamp"]) - accepted[f["job"]])
    else:
        for e in json_lines(b_log):
            f = e.get("fields", {})
            if f.get("message") == "delivered" and f.get("message_id") in by_mid:
                out.append(ts(e["timestamp"]) - by_mid[f["message_id"]])
    return out


def pct(values, p):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def one_run(mode, size, count, concurrency, floor=None):
    root = tempfile.mkdtemp(prefix=f"hispd-load-{mode}-")
    os.chmod(root, 0o755)  # Postfix's daemons run as the postfix user
    procs = []
    postfix_conf = None
    try:
        ports = {k: free_port() for k in ["amx", "asub", "bmx", "bsub", "sink", "relay"]}
        sink_dir = os.path.join(root, "sink")
        os.makedirs(sink_dir)
        if mode in ("a", "b"):
            procs.append(subprocess.Popen([tool("smtp-sink"), "-u", "root", "-d", sink_dir + "/%M.", f"127.0.0.1:{ports['sink']}", "256"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_port(ports["sink"])
        logs = {}
        pids = []
        if mode == "a":
            p, postfix_conf = postfix_relay(root, ports["relay"], ports["sink"])
            procs.append(p)
            wait_port(ports["relay"])
            target = ports["relay"]
            pids = [p.pid]
        else:
            max_size = max(26214400, size * 3)
            da, db = hisp_pair(root, ports["bmx"] if mode == "c" else ports["sink"], ports, max_size)
            for name, d in [("a", da)] + ([("b", db)] if mode == "c" else []):
                logs[name] = os.path.join(root, f"{name}.log")
                # HISPD_WRAP: a profiler to run hispd under (e.g. "valgrind --tool=massif").
                wrap = os.environ.get("HISPD_WRAP", "").split()
                p = subprocess.Popen([*wrap, HISPD, "--config", os.path.join(d, "hispd.toml"), "serve"], stdout=subprocess.DEVNULL, stderr=open(logs[name], "w"), env={**os.environ, "HISPD_LOG": "info"})
                procs.append(p)
                pids.append(p.pid)
            wait_port(ports["asub"])
            if mode == "c":
                wait_port(ports["bmx"])
            target = ports["asub"]
        time.sleep(0.3)
        cpu0 = sum(tree_stats(p)[0] for p in pids)
        t0 = time.time()
        src = subprocess.run([tool("smtp-source"), "-d", "-s", str(concurrency), "-m", str(count), "-l", str(size),
                              "-f", "ehr@a.example", "-t", "bob@b.example", "-M", "ehr.a.example", "-S", "load",
                              f"127.0.0.1:{target}"], capture_output=True, text=True)
        if src.returncode != 0:
            sys.exit(f"smtp-source: {src.stderr}")
        t_submitted = time.time()

        def delivered():
            if mode in ("a", "b"):
                return len(os.listdir(sink_dir))
            n = 0
            with open(logs["b"]) as f:
                for line in f:
                    if '"delivered"' in line:
                        n += 1
            return n

        deadline = time.time() + max(600, count * size / 2e6)
        while delivered() < count and time.time() < deadline:
            time.sleep(0.02)
        t_done = time.time()
        cpu = 0.0
        rss = {}
        for name, p in zip(["a", "b"] if mode != "a" else ["postfix"], pids):
            c, r = tree_stats(p)
            cpu += c
            rss[name] = round(r / 2**20, 1)
        n = delivered()
        if mode == "a":
            lat = latencies_postfix(os.path.join(root, "postfix.log"))
        else:
            lat = latencies_hispd(logs["a"], logs.get("b"))
        floor = floor if floor is not None else rsa_floor()
        cpu_per = (cpu - cpu0) / max(n, 1)
        return {
            "mode": mode, "size": size, "count": count, "delivered": n, "concurrency": concurrency,
            "msgs_per_s": round(n / (t_done - t0), 1),
            "accepted_per_s": round(count / (t_submitted - t0), 1),
            "p50_ms": round(pct(lat, 50) * 1000, 1) if lat else None,
            "p99_ms": round(pct(lat, 99) * 1000, 1) if lat else None,
            "cpu_ms_per_msg": round(cpu_per * 1000, 2),
            "rsa2048_sign_ms": round(floor * 1000, 3) if floor else None,
            "cpu_per_msg_in_rsa_signs": round(cpu_per / floor, 1) if floor else None,
            "peak_rss_mb": rss,
        }
    finally:
        if postfix_conf:
            stop_postfix(root, postfix_conf)
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if os.environ.get("BENCH_KEEP"):
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def matrix(args):
    floor_before = rsa_floor()
    rows = []
    for size, count, concurrencies in [(5120, args.count, [1, 4, 16]), (1048576, max(args.count // 10, 20), [1, 4])]:
        for c in concurrencies:
            base = None
            for mode in ["a", "b", "c"]:
                r = one_run(mode, size, count, c, floor_before)
                if mode == "a":
                    base = r
                r["ratio_to_a"] = round(r["msgs_per_s"] / base["msgs_per_s"], 3) if base and base["msgs_per_s"] else None
                rows.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    floor_after = rsa_floor()
    print(f"openssl speed rsa2048: {floor_before*1000:.3f} ms/sign before, {floor_after*1000:.3f} ms after\n")
    print("| run | size | concurrency | msgs/s | ratio to (a) | p50 ms | p99 ms | CPU ms/msg | CPU in RSA signs | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rss = ", ".join(f"{k} {v}" for k, v in r["peak_rss_mb"].items())
        size = "5 KB" if r["size"] < 100000 else "1 MB"
        print(f"| ({r['mode']}) | {size} | {r['concurrency']} | {r['msgs_per_s']} | {r['ratio_to_a']} | {r['p50_ms']} | {r['p99_ms']} | {r['cpu_ms_per_msg']} | {r['cpu_per_msg_in_rsa_signs']} | {rss} |")


def large(args):
    """Each size once alone and three times in a row on one connection (the
    next message arrives while the previous one is sealed and sent)."""
    print("| run | message | count | peak RSS MB | bound (2x size + 64 MiB) | msgs/s |")
    print("|---|---|---|---|---|---|")
    for size in [10 * 2**20, 100 * 2**20]:
        for mode in ["b", "c"]:
            for count in [1, 3]:
                r = one_run(mode, size, count, 1, 1.0)
                bound = round((2 * size + 64 * 2**20) / 2**20, 1)
                rss = ", ".join(f"{k} {v}" for k, v in r["peak_rss_mb"].items())
                print(f"| ({mode}) | {size // 2**20} MB | {r['delivered']}/{count} | {rss} | {bound} | {r['msgs_per_s']} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["a", "b", "c"], default="b")
    ap.add_argument("--size", type=int, default=5120)
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--matrix", action="store_true", help="(a), (b), (c) for 5 KB and 1 MB at several concurrencies")
    ap.add_argument("--large", action="store_true", help="10 MB and 100 MB through (b) and (c): peak RSS")
    a = ap.parse_args()
    if not os.path.exists(HISPD):
        sys.exit("build first: cargo build --release")
    if a.matrix:
        matrix(a)
    elif a.large:
        large(a)
    else:
        print(json.dumps(one_run(a.mode, a.size, a.count, a.concurrency), indent=2))


if __name__ == "__main__":
    main()
