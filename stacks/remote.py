"""SSH to a host with paramiko: verified host keys, logged commands, secrets kept out of logs.

Every command goes through `RemoteHost.run`, which logs it (redacted) and records it in
`transcript`, so tests and operators can see exactly what ran. Secrets never travel in argv: they
are uploaded as 0600 files over SFTP and commands point at the files.
"""
from __future__ import annotations

import base64
import binascii
import io
import logging
import shlex
import socket
import uuid
from dataclasses import dataclass, field
from typing import Iterable

import paramiko

log = logging.getLogger("digital_worker.stacks.remote")

REDACTED = "***"


class RemoteError(Exception):
    """Base of everything that goes wrong on a host; the message names the host and the step."""


class HostKeyError(RemoteError):
    """The host presented a key we do not expect (or one we were not told to trust)."""


class ConnectionLost(RemoteError):
    """The host went away (refused, reset, dropped mid-command)."""


class CommandFailed(RemoteError):
    def __init__(self, message: str, status: int, stderr: str) -> None:
        super().__init__(message)
        self.status = status
        self.stderr = stderr


@dataclass(frozen=True)
class SshTarget:
    """Where and how to log in. `host_key` is an OpenSSH public key line: `ssh-ed25519 AAAA...`."""

    address: str
    user: str = "root"
    port: int = 22
    private_key: str = field(default="", repr=False)
    host_key: str | None = None
    # Trust on first use: only when the stack explicitly asks for it and no key is given.
    accept_unknown_host_key: bool = False
    connect_timeout: float = 10.0

    @property
    def known_hosts_name(self) -> str:
        # OpenSSH's known_hosts spelling, which paramiko's HostKeys matches on.
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"

    @property
    def label(self) -> str:
        return f"{self.user}@{self.address}:{self.port}"


def parse_public_key(line: str) -> paramiko.PKey:
    """An OpenSSH public key line (`type base64 [comment]`) as a paramiko key."""
    parts = line.split()
    if len(parts) < 2:
        raise ValueError("host key must look like 'ssh-ed25519 AAAA...'")
    key_type, blob = parts[0], parts[1]
    try:
        data = base64.b64decode(blob, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"host key is not valid base64: {exc}") from None
    try:
        return paramiko.PKey.from_type_string(key_type, data)
    except Exception as exc:  # paramiko raises several types for unknown or corrupt keys
        raise ValueError(f"host key of type {key_type!r} cannot be read: {exc}") from None


def public_key_line(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


def load_private_key(text: str) -> paramiko.PKey:
    """A private key from its PEM/OpenSSH text, whatever its type."""
    last: Exception | None = None
    for key_class in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return key_class.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError) as exc:
            last = exc
    raise ValueError(f"SSH private key cannot be read ({last})")


class Redactor:
    """Replaces every known secret (and its base64 form) in text meant for logs or errors."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        if not secret or len(secret) < 4:
            return
        for form in (secret, secret.strip(), base64.b64encode(secret.encode()).decode()):
            if form and form not in self._secrets:
                self._secrets.append(form)
        # Multi-line secrets (private keys, kubeconfigs) may leak line by line.
        for line in secret.splitlines():
            if len(line.strip()) >= 16 and line.strip() not in self._secrets:
                self._secrets.append(line.strip())
        self._secrets.sort(key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text


class _RecordingPolicy(paramiko.MissingHostKeyPolicy):
    """Trust on first use, only where the stack opted in; the key seen is reported back."""

    def __init__(self) -> None:
        self.seen: paramiko.PKey | None = None

    def missing_host_key(self, client, hostname, key) -> None:
        self.seen = key
        client.get_host_keys().add(hostname, key.get_name(), key)


@dataclass(frozen=True)
class CommandResult:
    command: str
    status: int
    stdout: str
    stderr: str


class RemoteHost:
    """One SSH connection to one host. Use as a context manager."""

    def __init__(
        self,
        target: SshTarget,
        *,
        name: str | None = None,
        secrets: Iterable[str] = (),
        command_timeout: float = 900.0,
    ) -> None:
        self.target = target
        self.name = name or target.address
        self.redact = Redactor([target.private_key, *secrets])
        self.command_timeout = command_timeout
        self.transcript: list[CommandResult] = []
        self.host_key_seen: str | None = None
        self._client: paramiko.SSHClient | None = None

    # -- connection ---------------------------------------------------------------------------
    def __enter__(self) -> "RemoteHost":
        self.connect()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def connect(self) -> None:
        target = self.target
        client = paramiko.SSHClient()
        recording = _RecordingPolicy()
        if target.host_key:
            expected = parse_public_key(target.host_key)
            client.get_host_keys().add(target.known_hosts_name, expected.get_name(), expected)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        elif target.accept_unknown_host_key:
            client.set_missing_host_key_policy(recording)
        else:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                target.address,
                port=target.port,
                username=target.user,
                pkey=load_private_key(target.private_key),
                timeout=target.connect_timeout,
                banner_timeout=target.connect_timeout,
                auth_timeout=target.connect_timeout,
                allow_agent=False,
                look_for_keys=False,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyError(
                f"host {self.name} ({target.label}) presented {exc.key.get_name()} key "
                f"{exc.key.fingerprint} which is not the expected host key; refusing to connect"
            ) from None
        except paramiko.SSHException as exc:
            client.close()
            if "not found in known_hosts" in str(exc):
                raise HostKeyError(
                    f"host {self.name} ({target.label}) has an unknown host key; set its hostKey "
                    f"(or acceptUnknownHostKey: true to trust on first use)"
                ) from None
            raise ConnectionLost(f"host {self.name} ({target.label}): SSH failed: {self.redact(str(exc))}") from None
        except (OSError, socket.timeout) as exc:
            client.close()
            raise ConnectionLost(f"host {self.name} ({target.label}) is unreachable: {exc}") from None
        transport = client.get_transport()
        assert transport is not None
        self.host_key_seen = public_key_line(transport.get_remote_server_key())
        self._client = client
        log.info("host %s: connected to %s, host key %s", self.name, target.label,
                 transport.get_remote_server_key().fingerprint)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _require_client(self) -> paramiko.SSHClient:
        if self._client is None:
            raise ConnectionLost(f"host {self.name}: not connected")
        return self._client

    # -- commands -----------------------------------------------------------------------------
    def as_root(self, command: str) -> str:
        """`command` wrapped so it runs as root whoever we logged in as (sudo must not prompt)."""
        if self.target.user == "root":
            return command
        return f"sudo -n sh -c {shlex.quote(command)}"

    def run(
        self,
        command: str,
        *,
        step: str,
        check: bool = True,
        root: bool = True,
        timeout: float | None = None,
    ) -> CommandResult:
        """Run `command` (through `sh -c` on the host); raise CommandFailed on a non-zero exit if `check`."""
        client = self._require_client()
        full = self.as_root(command) if root else command
        shown = self.redact(command)
        log.info("host %s [%s]: $ %s", self.name, step, shown)
        try:
            _, stdout, stderr = client.exec_command(full, timeout=timeout or self.command_timeout)
            out = stdout.read().decode(errors="replace")
            err = stderr.read().decode(errors="replace")
            status = stdout.channel.recv_exit_status()
        except (OSError, EOFError, socket.timeout, paramiko.SSHException) as exc:
            self.close()
            raise ConnectionLost(
                f"host {self.name}: connection lost during {step!r} ({type(exc).__name__}: {exc})"
            ) from None
        transport = client.get_transport()
        if status == -1 or transport is None or not transport.is_active():
            # No exit status means the channel closed under us: the host dropped mid-command.
            self.close()
            raise ConnectionLost(f"host {self.name}: connection lost during {step!r}; the step did not finish")
        result = CommandResult(shown, status, self.redact(out), self.redact(err))
        self.transcript.append(result)
        log.info("host %s [%s]: exit %d", self.name, step, status)
        if full != command and status != 0 and err.startswith("sudo:"):
            # Whatever the step, the real problem is the login user's rights.
            raise CommandFailed(
                f"host {self.name}: user {self.target.user} needs passwordless sudo for {step!r} "
                f"({result.stderr.strip().splitlines()[0]})",
                status, result.stderr,
            )
        if check and status != 0:
            tail = result.stderr.strip().splitlines()[-5:] or result.stdout.strip().splitlines()[-5:]
            raise CommandFailed(
                f"host {self.name}: {step} failed (exit {status}): {' | '.join(tail) or 'no output'}",
                status, result.stderr,
            )
        return result

    def put(self, path: str, content: bytes | str, *, step: str, mode: int = 0o600) -> None:
        """Write a file on the host atomically with `mode`, as root (via a private temp file)."""
        client = self._require_client()
        data = content.encode() if isinstance(content, str) else content
        log.info("host %s [%s]: upload %d bytes to %s (mode %o)", self.name, step, len(data), path, mode)
        try:
            sftp = client.open_sftp()
            try:
                home = sftp.normalize(".")
                staging = f"{home}/.dw-upload-{uuid.uuid4().hex[:12]}"
                with sftp.open(staging, "wb") as handle:
                    handle.chmod(0o600)  # before any byte lands: nobody else may read a secret
                    handle.write(data)
            finally:
                sftp.close()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self.close()
            raise ConnectionLost(f"host {self.name}: connection lost during {step!r} (upload: {exc})") from None
        directory = path.rsplit("/", 1)[0] or "/"
        self.run(
            f"mkdir -p {shlex.quote(directory)} && install -m {mode:o} {shlex.quote(staging)} {shlex.quote(path)}"
            f" && rm -f {shlex.quote(staging)}",
            step=step,
        )
