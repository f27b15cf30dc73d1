#!/usr/bin/env python3
"""Load benchmark for hispd (issue 9, first part): (b) submission -> sealing
-> delivery to Postfix's smtp-sink, and (c) a full round trip hispd A -> hispd
B (decrypt, verify, mailbox). Reports messages per second, CPU seconds per
message and peak RSS of each hispd process, beside `openssl speed rsa2048`
from the same run. Loopback only. Usage:

    cargo build --release
    python3 bench/load.py --mode b --size 5120 --count 500 --concurrency 4
    python3 bench/load.py --mode c --size 5120 --count 500 --concurrency 4
"""
import argparse, json, os, shutil, smtplib, ssl, socket, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HISPD = os.path.join(ROOT, "target", "release", "hispd")


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


def proc_stats(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / tick
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) * 1024
    return cpu, rss


def node(root, domain, mx, sub, delivery, extra=""):
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

[delivery]
smart_host = "127.0.0.1:{delivery}"
retry_base_secs = 1

[discovery]
sources = ["local", "public"]

[notify]
mdn_timeout_secs = 86400

[[domains]]
name = "{domain}"
{extra}""")
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["b", "c"], default="b")
    ap.add_argument("--size", type=int, default=5120)
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=4)
    a = ap.parse_args()
    if not os.path.exists(HISPD):
        sys.exit("build first: cargo build --release")
    root = tempfile.mkdtemp(prefix="hispd-load-")
    procs = []
    try:
        ports = {k: free_port() for k in ["amx", "asub", "bmx", "bsub", "sink"]}
        da = node(root, "a.example", ports["amx"], ports["asub"], ports["bmx"] if a.mode == "c" else ports["sink"])
        db = node(root, "b.example", ports["bmx"], ports["bsub"], ports["amx"])
        for d, dom in [(da, "a.example"), (db, "b.example")]:
            run("certs", "new-ca", "--out", os.path.join(root, f"ca-{dom}"))
            run("certs", "issue", "--ca", os.path.join(root, f"ca-{dom}"), "--domain", dom, "--out", os.path.join(d, "certs", dom, "private"))
        for d, dom, other in [(da, "a.example", "b.example"), (db, "b.example", "a.example")]:
            os.makedirs(os.path.join(d, "certs", dom, "anchors", "both"))
            shutil.copy(os.path.join(root, f"ca-{other}", "cert.pem"), os.path.join(d, "certs", dom, "anchors", "both", "other.pem"))
            os.makedirs(os.path.join(d, "certs", "public"))
            shutil.copy(os.path.join(root, other, "certs", other, "private", "cert.pem"), os.path.join(d, "certs", "public", "peer.pem"))
        conf_a = os.path.join(da, "hispd.toml")
        run("--config", conf_a, "users", "add", "ehr@a.example", stdin=b"load-test-password\n")

        sink_dir = os.path.join(root, "sink")
        os.makedirs(sink_dir)
        if a.mode == "b":
            procs.append(subprocess.Popen(["smtp-sink", "-u", "root", "-d", sink_dir + "/%M.", f"127.0.0.1:{ports['sink']}", "200"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_port(ports["sink"])
        logs = {}
        for name, d in [("a", da)] + ([("b", db)] if a.mode == "c" else []):
            logs[name] = open(os.path.join(root, f"{name}.log"), "w")
            p = subprocess.Popen([HISPD, "--config", os.path.join(d, "hispd.toml"), "serve"], stdout=subprocess.DEVNULL, stderr=logs[name], env={**os.environ, "HISPD_LOG": "info"})
            procs.append(p)
        wait_port(ports["asub"])
        if a.mode == "c":
            wait_port(ports["bmx"])
        a_pid = procs[-1 if a.mode == "b" else -2].pid
        b_pid = procs[-1].pid if a.mode == "c" else None

        body = ("x" * 75 + "\r\n") * (a.size // 77 + 1)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        per = a.count // a.concurrency
        cpu0 = proc_stats(a_pid)[0]
        cpu0b = proc_stats(b_pid)[0] if b_pid else 0
        t0 = time.time()

        def worker(w):
            s = smtplib.SMTP("127.0.0.1", ports["asub"], timeout=60)
            s.starttls(context=ctx)
            s.login("ehr@a.example", "load-test-password")
            for i in range(per):
                mid = f"<load-{w}-{i}@a.example>"
                s.sendmail("ehr@a.example", ["bob@b.example"], f"From: ehr@a.example\r\nTo: bob@b.example\r\nSubject: load\r\nMessage-ID: {mid}\r\n\r\n{body}")
            s.quit()

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(a.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_submitted = time.time()
        total = per * a.concurrency
        deadline = time.time() + 600

        def delivered():
            if a.mode == "b":
                return sum(1 for _ in os.listdir(sink_dir))
            with open(os.path.join(root, "b.log")) as f:
                return sum(1 for line in f if '"delivered"' in line and "load-" in line)

        while delivered() < total and time.time() < deadline:
            time.sleep(0.05)
        t_done = time.time()
        cpu_a, rss_a = proc_stats(a_pid)
        cpu_b, rss_b = proc_stats(b_pid) if b_pid else (0, 0)
        n = delivered()
        speed = subprocess.run(["openssl", "speed", "-seconds", "2", "rsa2048"], capture_output=True, text=True).stdout
        signs = next((float(l.split()[5]) for l in speed.splitlines() if l.startswith("rsa 2048 bits")), 0)
        cpu_per = ((cpu_a - cpu0) + (cpu_b - cpu0b)) / max(n, 1)
        print(json.dumps({
            "mode": a.mode, "size": a.size, "count": total, "delivered": n, "concurrency": a.concurrency,
            "msgs_per_s": round(n / (t_done - t0), 1),
            "submission_msgs_per_s": round(total / (t_submitted - t0), 1),
            "cpu_ms_per_msg": round(cpu_per * 1000, 2),
            "rsa2048_sign_ms": round(1000 / signs, 3) if signs else None,
            "cpu_per_msg_in_rsa_signs": round(cpu_per * signs, 1) if signs else None,
            "peak_rss_mb": {"a": round(rss_a / 2**20, 1), "b": round(rss_b / 2**20, 1)},
        }, indent=2))
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
