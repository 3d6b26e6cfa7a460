"""Real sshd "hosts" on loopback for the on-prem provider tests.

Each host is Debian's sshd on its own port, started inside its own mount namespace where a
per-host directory is bind-mounted over /usr/local/bin, /var/lib and /root: so every host has its own
`nvidia-smi`, its own k3s binary and its own /var/lib/digital-worker, although they all run on
this machine. What cannot run here (the GPU driver, k3s itself) is a small fake: `nvidia-smi`
prints a GPU, and the k3s "installer" drops a `k3s` whose `kubectl` keeps node objects as JSON
files in a directory shared by all hosts (the "cluster").
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko

from dwtest_support import free_port, stop_process


FAKE_NVIDIA_SMI = """#!/bin/sh
# Stand-in for the NVIDIA driver's nvidia-smi: answers the one query the provider makes.
i=0
while [ $i -lt {count} ]; do echo "{product}, 550.54.15, 81920"; i=$((i+1)); done
"""

FAKE_NVIDIA_CTK = """#!/bin/sh
echo "NVIDIA Container Toolkit CLI version 1.17.3"
"""

FAKE_TOOLKIT_INSTALLER = """#!/bin/sh
set -eu
cat > /usr/local/bin/nvidia-ctk <<'EOF'
#!/bin/sh
echo "NVIDIA Container Toolkit CLI version 1.17.3"
EOF
chmod 755 /usr/local/bin/nvidia-ctk
"""

# The fake k3s binary: a Python script keeping node objects in CLUSTER/nodes/<name>.json.
FAKE_K3S = r'''#!/usr/bin/python3
import json, os, sys
CLUSTER = {cluster!r}
NODES = os.path.join(CLUSTER, "nodes")
with open(os.path.join(CLUSTER, "kubectl.log"), "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\n")
args = sys.argv[1:]
if args[:1] == ["--version"]:
    print("k3s version v1.31.4+k3s1 (fake)"); sys.exit(0)
# k3s's embedded containerd tools: images kept per host in /var/lib/rancher (the host's namespace).
IMAGES = "/var/lib/rancher/k3s/images.txt"
def images():
    try:
        return open(IMAGES).read().split()
    except FileNotFoundError:
        return []
if args[:1] == ["crictl"]:
    if args[1] == "inspecti":
        sys.exit(0 if args[2] in images() else 1)
    if args[1] == "pull":
        if os.path.exists("/var/lib/registry-down"):
            print("pull access denied: registry unreachable", file=sys.stderr); sys.exit(1)
        with open(IMAGES, "a") as f: f.write(args[2] + "\n")
        with open(os.path.join(CLUSTER, "pulls.log"), "a") as log: log.write(args[2] + "\n")
        print("Image is up to date for " + args[2]); sys.exit(0)
if args[:2] == ["ctr", "run"]:
    rest = [a for a in args[2:] if a != "--rm"]
    if rest[:1] == ["--gpus"]: rest = rest[2:]
    image, container = rest[0], rest[1]
    with open(os.path.join(CLUSTER, "smoke.log"), "a") as log: log.write(container + " " + image + "\n")
    if image not in images():
        print("ctr: image \"" + image + "\": not found", file=sys.stderr); sys.exit(1)
    if os.path.exists("/var/lib/smoke-fails"):
        print("nvidia-container-cli: initialization error: nvml error: driver not loaded", file=sys.stderr); sys.exit(1)
    import subprocess
    names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True).stdout.splitlines()
    for i, line in enumerate(names):
        print(f"GPU {{i}}: {{line.split(',')[0]}} (UUID: GPU-fake-{{i}})")
    sys.exit(0)
if args[:1] != ["kubectl"]:
    print("fake k3s: only --version, crictl, ctr run and kubectl", file=sys.stderr); sys.exit(2)
args = args[1:]
def path(name): return os.path.join(NODES, name + ".json")
def load(name):
    try:
        with open(path(name)) as f: return json.load(f)
    except FileNotFoundError:
        print(f'Error from server (NotFound): nodes "{{name}}" not found', file=sys.stderr); sys.exit(1)
def save(node):
    with open(path(node["metadata"]["name"]), "w") as f: json.dump(node, f)
if args[:3] == ["config", "view", "--raw"]:
    print("apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    server: https://127.0.0.1:6443\n"
          "    certificate-authority-data: RkFLRUNB\n  name: default\ncontexts:\n- context: {{cluster: default, user: default}}\n"
          "  name: default\ncurrent-context: default\nusers:\n- name: default\n  user:\n"
          "    client-key-data: FAKE-CLIENT-KEY-0123456789abcdef\n"); sys.exit(0)
verb = args[0]
if verb == "get":
    node = load(args[2])
    print(json.dumps(node) if "json" in args else "node/" + args[2]); sys.exit(0)
if verb == "label":
    node = load(args[2]); labels = node["metadata"].setdefault("labels", {{}})
    for a in args[3:]:
        if a.startswith("--"): continue
        if a.endswith("-"): labels.pop(a[:-1], None)
        else: k, v = a.split("=", 1); labels[k] = v
    save(node); print("node/" + args[2] + " labeled"); sys.exit(0)
if verb == "taint":
    node = load(args[2]); taints = node["spec"].setdefault("taints", [])
    for a in args[3:]:
        if a.startswith("--"): continue
        remove = a.endswith("-"); a = a.rstrip("-")
        kv, effect = a.rsplit(":", 1); k, _, v = kv.partition("=")
        taints[:] = [t for t in taints if not (t["key"] == k and t["effect"] == effect)]
        if not remove: taints.append({{"key": k, "value": v, "effect": effect}})
    save(node); print("node/" + args[2] + " tainted"); sys.exit(0)
if verb == "drain":
    node = load(args[1]); node["spec"]["unschedulable"] = True; node["metadata"].setdefault("annotations", {{}})["drained"] = "yes"
    save(node); print("node/" + args[1] + " drained"); sys.exit(0)
if verb == "delete":
    load(args[2]); os.remove(path(args[2])); print('node "' + args[2] + '" deleted'); sys.exit(0)
print("fake kubectl: unsupported " + " ".join(args), file=sys.stderr); sys.exit(2)
'''

# The fake k3s installer: same calling convention as get.k3s.io (`sh - server|agent [flags]`,
# K3S_URL / INSTALL_K3S_VERSION in the environment), registers the node in the shared cluster.
FAKE_K3S_INSTALLER = r'''#!/bin/sh
exec /usr/bin/python3 - "$@" <<'PYEOF'
import json, os, signal, sys, time
CLUSTER = {cluster!r}
K3S = {k3s!r}
args = sys.argv[1:]
role = args[0]
opts = {{"--node-label": [], "--node-taint": []}}
i = 1
while i < len(args):
    if args[i] in opts: opts[args[i]].append(args[i + 1])
    else: opts[args[i]] = args[i + 1]
    i += 2
with open(os.path.join(CLUSTER, "installs.log"), "a") as log:
    log.write(f"{{opts['--node-name']}} {{role}}\n")
# What anyone on the host could see in `ps` and the environment: kept to check no secret is there.
with open(os.path.join(CLUSTER, "argv.log"), "a") as log:
    log.write(" ".join(sys.argv) + " ENV " + " ".join(f"{{k}}={{v}}" for k, v in sorted(os.environ.items())) + "\n")
# A host that drops mid-install: kill this session's sshd processes (never the listener).
drop_flag = "/var/lib/drop-during-install"
if os.path.exists(drop_flag):
    os.remove(drop_flag)
    listener = int(open(os.environ.get("FAKE_LISTENER_PID_FILE", "/var/lib/sshd.pid")).read())
    pid = os.getppid()
    while pid > 1:
        stat = open(f"/proc/{{pid}}/stat").read()
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if comm == "sshd" and pid != listener:
            os.kill(pid, signal.SIGKILL)
        pid = ppid
    time.sleep(0.5); sys.exit(1)
token = open(opts["--token-file"]).read().strip()
os.makedirs(os.path.join(CLUSTER, "nodes"), exist_ok=True)
if role == "server":
    open(os.path.join(CLUSTER, "token"), "w").write(token)
    open(os.path.join(CLUSTER, "server_url"), "w").write("https://" + opts["--tls-san"] + ":6443")
else:
    expected = open(os.path.join(CLUSTER, "token")).read()
    if token != expected:
        print("[ERROR] agent rejected: token does not match the server", file=sys.stderr); sys.exit(1)
    if os.environ.get("K3S_URL") != open(os.path.join(CLUSTER, "server_url")).read():
        print("[ERROR] agent cannot reach " + str(os.environ.get("K3S_URL")), file=sys.stderr); sys.exit(1)
with open("/usr/local/bin/k3s", "w") as f: f.write(K3S)
os.chmod("/usr/local/bin/k3s", 0o755)
uninstall = "k3s-uninstall.sh" if role == "server" else "k3s-agent-uninstall.sh"
# Uninstalling the (only) server takes its datastore, so the whole cluster, with it.
cluster_gone = ("rm -rf " + os.path.join(CLUSTER, "nodes") + "/*.json " + os.path.join(CLUSTER, "token") + "\n"
                if role == "server" else "")
with open("/usr/local/bin/" + uninstall, "w") as f:
    f.write("#!/bin/sh\nrm -f /usr/local/bin/k3s /usr/local/bin/" + uninstall + "\nrm -rf /var/lib/rancher\n"
            + cluster_gone + "echo uninstalled >> " + os.path.join(CLUSTER, "installs.log") + "\n")
os.chmod("/usr/local/bin/" + uninstall, 0o755)
os.makedirs("/var/lib/rancher/k3s", exist_ok=True)
name = opts["--node-name"]
node_path = os.path.join(CLUSTER, "nodes", name + ".json")
if not os.path.exists(node_path):
    labels = dict(l.split("=", 1) for l in opts["--node-label"])
    taints = []
    for t in opts["--node-taint"]:
        kv, effect = t.rsplit(":", 1); k, _, v = kv.partition("=")
        taints.append({{"key": k, "value": v, "effect": effect}})
    json.dump({{"metadata": {{"name": name, "labels": labels}}, "spec": {{"taints": taints}}}}, open(node_path, "w"))
print("[INFO] fake k3s " + role + " " + name + " installed")
PYEOF
'''


def make_installer(cluster: Path) -> str:
    k3s = FAKE_K3S.format(cluster=str(cluster))
    return FAKE_K3S_INSTALLER.format(cluster=str(cluster), k3s=k3s)


@dataclass
class FakeHost:
    name: str
    root: Path
    port: int
    host_key: str  # "ssh-ed25519 AAAA..."
    process: subprocess.Popen | None = None
    # Files bind-mounted over the real ones inside this host's namespace (e.g. a passwd with a login user).
    overlays: dict[str, Path] | None = None

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def varlib(self) -> Path:
        return self.root / "varlib"

    def start(self) -> None:
        extra = "".join(f"mount --bind {source} {target} && " for target, source in (self.overlays or {}).items())
        script = (
            extra +
            f"mount --bind {self.bin} /usr/local/bin && mount --bind {self.varlib} /var/lib && "
            # root's own home per host: no ~/.bashrc of this machine runs in every session.
            f"mount --bind {self.root / 'home'} /root && "
            f"exec /usr/sbin/sshd -D -f {self.root / 'sshd_config'} -E {self.root / 'sshd.log'}"
        )
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        # unshare and sh exec into sshd: the process we started is the listener.
        (self.varlib / "sshd.pid").write_text(str(self.process.pid))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    if sock.recv(4).startswith(b"SSH"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd for {self.name} did not start: {(self.root / 'sshd.log').read_text()}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=5)
        self.process = None

    def set_gpu(self, product: str | None, count: int = 1) -> None:
        path = self.bin / "nvidia-smi"
        if product is None:
            path.unlink(missing_ok=True)
            return
        path.write_text(FAKE_NVIDIA_SMI.format(product=product, count=count))
        path.chmod(0o755)

    def set_toolkit(self, present: bool) -> None:
        path = self.bin / "nvidia-ctk"
        if not present:
            path.unlink(missing_ok=True)
            return
        path.write_text(FAKE_NVIDIA_CTK)
        path.chmod(0o755)

    def drop_during_next_install(self) -> None:
        (self.varlib / "drop-during-install").write_text("1")

    @property
    def marker(self) -> Path:
        return self.varlib / "digital-worker" / "node.json"

    def k3s_installed(self) -> bool:
        return (self.bin / "k3s").exists()


class FakeFleet:
    """Several FakeHosts sharing one client key and one fake cluster directory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        # sshd's privilege separation directory (tmpfs /run starts without it).
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.cluster = workdir / "cluster"
        (self.cluster / "nodes").mkdir(parents=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / "client_key")],
                       check=True)
        self.private_key = (workdir / "client_key").read_text()
        self.public_key = (workdir / "client_key.pub").read_text().strip()
        self.hosts: list[FakeHost] = []
        self.installer = make_installer(self.cluster)

    def add_host(self, name: str, *, gpu: str | None = "NVIDIA A100-SXM4-80GB", gpus: int = 2,
                 toolkit: bool = True, login_user: str | None = None, sudo: bool = True) -> FakeHost:
        """`login_user`: a non-root account on this host only (passwd/group/shadow overlays), with
        passwordless sudo when `sudo`, like a cloud image's default user."""
        root = self.workdir / name
        for sub in ("bin", "varlib", "home"):
            (root / sub).mkdir(parents=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "host_key")], check=True)
        (root / "authorized_keys").write_text(self.public_key + "\n")
        port = free_port()
        (root / "sshd_config").write_text(textwrap.dedent(f"""\
            Port {port}
            ListenAddress 127.0.0.1
            HostKey {root / 'host_key'}
            AuthorizedKeysFile %h/.ssh/authorized_keys {root / 'authorized_keys'}
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            PermitRootLogin prohibit-password
            UsePAM no
            StrictModes no
            PidFile {root / 'sshd.pid.file'}
            Subsystem sftp internal-sftp
            LogLevel VERBOSE
            """))
        public = (root / "host_key.pub").read_text().split()
        overlays = self._login_user_overlays(root, login_user, sudo) if login_user else None  # after authorized_keys
        host = FakeHost(name=name, root=root, port=port, host_key=f"{public[0]} {public[1]}", overlays=overlays)
        host.set_gpu(gpu, gpus)
        host.set_toolkit(toolkit)
        host.start()
        self.hosts.append(host)
        return host

    @staticmethod
    def _login_user_overlays(root: Path, user: str, sudo: bool) -> dict[str, Path]:
        etc = root / "etc"
        (etc / "sudoers.d").mkdir(parents=True)
        # The login user's home is mounted on /mnt inside the namespace: the pytest tmp path is
        # root-only, and sshd reads a user's authorized_keys as that user.
        home = root / f"home-{user}"
        (home / ".ssh").mkdir(parents=True)
        shutil.copy(root / "authorized_keys", home / ".ssh" / "authorized_keys")
        for path in (home, home / ".ssh", home / ".ssh" / "authorized_keys"):
            os.chown(path, 4242, 4242)
        for name, line in (("passwd", f"{user}:x:4242:4242::/mnt:/bin/sh"), ("group", f"{user}:x:4242:"),
                           ("shadow", f"{user}:*:20000:0:99999:7:::")):
            original = Path(f"/etc/{name}").read_text()
            (etc / name).write_text(original.rstrip("\n") + "\n" + line + "\n")
            (etc / name).chmod(Path(f"/etc/{name}").stat().st_mode & 0o777)
        if sudo:
            rule = etc / "sudoers.d" / "digital-worker-test"
            rule.write_text(f"{user} ALL=(ALL) NOPASSWD:ALL\n")
            rule.chmod(0o440)
        return {"/etc/passwd": etc / "passwd", "/etc/group": etc / "group", "/etc/shadow": etc / "shadow",
                "/etc/sudoers.d": etc / "sudoers.d", "/mnt": home}

    def node(self, name: str) -> dict | None:
        import json

        path = self.cluster / "nodes" / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def installs(self) -> list[str]:
        path = self.cluster / "installs.log"
        return path.read_text().splitlines() if path.exists() else []

    def stop(self) -> None:
        for host in self.hosts:
            host.stop()


def other_host_key() -> str:
    """A well-formed ed25519 host key that no fake host has."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{tmp}/k"], check=True)
        parts = Path(f"{tmp}/k.pub").read_text().split()
    return f"{parts[0]} {parts[1]}"


def has_tools() -> bool:
    return bool(shutil.which("unshare") and os.path.exists("/usr/sbin/sshd") and os.geteuid() == 0)
