"""What the vault benchmarks share (scripts/bench-bus, scripts/bench-relay):
a vault made with `coffre init` and its TOTP codes, its daemon, a member's
session over the door from Python, a RabbitMQ broker from `coffre bus
broker-config`, and OpenVPN servers and clients in network namespaces.
Everything started here is stopped by `Stack.close()` (call it in a
`finally`)."""
import base64, hashlib, hmac, http.client, json, os, re, shutil, signal, socket, ssl, struct, subprocess, sys, tempfile, time

UP = "Initialization Sequence Completed"


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


class Vault:
    """`coffre init DIR` with alice as superuser, a 64 MiB argon2id KDF and
    TOTP steps of `period` seconds; each code is used once."""

    def __init__(self, bin, tmp, name, period=2, size="32M"):
        self.bin, self.dir, self.period = bin, f"{tmp}/{name}", period
        self.pw = f"{tmp}/{name}.pw"; open(self.pw, "w").write("benchmark password")
        self.identity = f"{tmp}/{name}.identity"
        self.port = free_port()
        out = subprocess.run([bin, "init", self.dir, "--admin", "alice", "--password-file", self.pw, "--size", size,
            "--identity-out", self.identity, "--listen", f"127.0.0.1:{self.port}", "--totp-period", str(period),
            "--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "65536", "--pbkdf-parallel", "2"],
            check=True, capture_output=True, text=True).stdout
        secret = re.search(r"secret=([A-Z2-7]+)", out).group(1)
        self.key = base64.b32decode(secret + "=" * (-len(secret) % 8))
        self.last = 0
        self.env = dict(os.environ, COFFRE_IDENTITY=self.identity)
        self.daemon = None

    def totp(self):
        """A code for a step not used yet (waits for the next step)."""
        while int(time.time()) // self.period <= self.last:
            time.sleep(0.05)
        step = int(time.time()) // self.period; self.last = step
        h = hmac.new(self.key, struct.pack(">Q", step), hashlib.sha1).digest(); o = h[19] & 15
        return "%06d" % ((struct.unpack(">I", h[o:o+4])[0] & 0x7fffffff) % 1000000)

    def password(self):
        return open(self.pw).read()

    def cli(self, *args, check=True):
        return subprocess.run([self.bin, *args], env=self.env, check=check, capture_output=True)

    def status(self):
        return json.loads(self.cli("status", "--json").stdout)

    def serve(self):
        self.daemon = subprocess.Popen([self.bin, "serve", self.dir], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.daemon.stdout.readline()

    def enter(self):
        """A session kept by a detached heartbeat process; `leave` ends both."""
        self.cli("enter", "--detach", "--password-file", self.pw, "--totp", self.totp(), "--heartbeat", "5")

    def stop(self):
        if self.daemon:
            self.cli("leave", check=False)
            self.daemon.send_signal(signal.SIGTERM); self.daemon.wait(timeout=60)
            self.daemon = None


class Door:
    """A member's mutual-TLS connection to the door, kept open across
    commands (one HTTP/1.1 request at a time)."""

    def __init__(self, identity, tmp):
        id = json.load(open(identity))
        host, port = id["server"].rsplit(":", 1)
        d = tempfile.mkdtemp(dir=tmp)
        for k in ("ca_pem", "cert_pem", "key_pem"):
            with open(f"{d}/{k}", "w") as f: f.write(id[k])
        ctx = ssl.create_default_context(cafile=f"{d}/ca_pem")
        ctx.load_cert_chain(f"{d}/cert_pem", f"{d}/key_pem")
        shutil.rmtree(d)
        ctx.check_hostname = True
        self.ctx, self.host, self.port = ctx, host, int(port)
        self.conn = None

    def call(self, cmd):
        for attempt in (0, 1):
            if self.conn is None:
                raw = socket.create_connection((self.host, self.port), 10)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx)
                self.conn.sock = self.ctx.wrap_socket(raw, server_hostname="coffre")
            try:
                self.conn.request("POST", "/v1/command", json.dumps(cmd), {"Host": "coffre", "Content-Type": "application/json"})
                r = self.conn.getresponse()
                body = r.read()
                if r.getheader("Connection", "").lower() == "close":
                    self.conn.close(); self.conn = None
                return json.loads(body)
            except (http.client.HTTPException, OSError):
                self.conn.close(); self.conn = None
                if attempt:
                    raise


class Stack:
    """Processes and namespaces to stop and remove at the end."""

    def __init__(self):
        self.procs, self.netns, self.epmd, self.vaults = [], [], [], []

    def broker(self, run, port, log):
        """Starts a broker from `coffre bus broker-config`'s `run`, on its own
        node name, epmd and distribution ports; waits until it listens."""
        epmd, dist = free_port(), free_port()
        f = open(log, "w")
        p = subprocess.Popen([run], stdout=f, stderr=f, start_new_session=True,
            env=dict(os.environ, RABBITMQ_NODENAME=f"coffrebench{os.getpid()}@localhost",
                     ERL_EPMD_PORT=str(epmd), RABBITMQ_DIST_PORT=str(dist)))
        self.procs.append(("broker", p)); self.epmd.append(epmd)
        end = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close(); return p
            except OSError:
                if time.time() > end or p.poll() is not None:
                    sys.exit("the broker did not start:\n" + open(log).read())
                time.sleep(0.2)

    def spawn(self, args, log=None, ns=None):
        if ns:
            args = ["nsenter", f"--net=/run/netns/{ns}", *args]
        out = open(log, "w") if log else subprocess.DEVNULL
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self.procs.append(("proc", p))
        return p

    def vpn_net(self, tag):
        """A server namespace (192.0.2.1 on a bridge) and a client namespace
        (192.0.2.11) joined by a veth pair; returns their names."""
        sns, cns = f"cvbs{tag}", f"cvbc{tag}"
        def sh(*a): subprocess.run(a, check=True, capture_output=True)
        sh("ip", "netns", "add", sns); self.netns.append(sns)
        sh("ip", "netns", "add", cns); self.netns.append(cns)
        sh("ip", "-n", sns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sns, "addr", "add", "192.0.2.1/24", "dev", "br0")
        sh("ip", "-n", sns, "link", "set", "br0", "up"); sh("ip", "-n", sns, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"cvv{tag}", "type", "veth", "peer", "name", f"cvp{tag}")
        sh("ip", "link", "set", f"cvv{tag}", "netns", sns); sh("ip", "link", "set", f"cvp{tag}", "netns", cns)
        sh("ip", "-n", sns, "link", "set", f"cvv{tag}", "master", "br0", "up")
        sh("ip", "-n", cns, "addr", "add", "192.0.2.11/24", "dev", f"cvp{tag}")
        sh("ip", "-n", cns, "link", "set", f"cvp{tag}", "up"); sh("ip", "-n", cns, "link", "set", "lo", "up")
        return sns, cns

    def openvpn(self, ns, log, *args):
        if os.path.exists(log): os.remove(log)
        return self.spawn(["openvpn", *args, "--log", log], ns=ns)

    def close(self):
        for v in self.vaults:
            try: v.stop()
            except Exception as e: print(f"stopping {v.dir}: {e}", file=sys.stderr)
        for kind, p in reversed(self.procs):
            if p.poll() is not None: continue
            p.send_signal(signal.SIGTERM)
            try: p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                if kind == "broker": os.killpg(p.pid, signal.SIGKILL)
                else: p.kill()
                p.wait()
        for port in self.epmd:
            subprocess.run(["epmd", "-port", str(port), "-kill"], capture_output=True)
        for ns in self.netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def wait_log(p, log, want, within=30):
    """Waits for `want` in the log of process `p`; exits on a failure."""
    end = time.time() + within
    while time.time() < end:
        try: t = open(log).read()
        except FileNotFoundError: t = ""
        if want in t: return
        if "AUTH_FAILED" in t or p.poll() is not None: sys.exit(f"{log}:\n{t}")
        time.sleep(0.002)
    sys.exit(f"timeout waiting for {want!r} in {log}")
