"""Running a Pulumi program under `pulumi.runtime.Mocks` and recording what it registers.

The Pulumi CLI and provider plugins cannot run here; Pulumi's own mock monitor stands in for the
engine. We subclass it only to also record each registration's dependencies, parent and
secret outputs, which the plain `Mocks.new_resource` hook does not see.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import pulumi
from pulumi.runtime.mocks import MockMonitor


@dataclass
class Registration:
    urn: str
    typ: str
    name: str
    inputs: dict
    parent: str
    dependencies: list[str]
    secret_outputs: list[str]
    provider: str
    secret_inputs: set[str] = field(default_factory=set)


SECRET_SIG_KEY = "4dabf18193072939515e22adb298388d"
SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"


def unwrap_secrets(value, path: str, found: set[str]):
    """Plain values, noting where secrets were (the wire wraps them in a signature dict)."""
    if isinstance(value, dict):
        if value.get(SECRET_SIG_KEY) == SECRET_SIG:
            found.add(path)
            return unwrap_secrets(value.get("value"), path, found)
        return {k: unwrap_secrets(v, f"{path}.{k}" if path else k, found) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap_secrets(v, path, found) for v in value]
    return value


# Outputs a real provider would compute, for the few places our program reads them.
def computed_outputs(typ: str, name: str, inputs: dict) -> dict:
    if typ == "aws:eks/cluster:Cluster":
        return {"endpoint": f"https://{name}.eks.example", "certificateAuthority": {"data": "Q0EtREFUQQ=="},
                "name": inputs.get("name", name)}
    if typ.startswith("pulumi-python:dynamic") and typ.endswith("GpuHost"):
        outs = {"host_key_seen": inputs.get("host_key") or "ssh-ed25519 AAAA-seen"}
        if inputs.get("role") == "server":
            outs.update(server_url=f"https://{inputs['address']}:6443", k3s_token="generated-token-0123456789",
                        kubeconfig=f"apiVersion: v1\nclusters: [{{cluster: {{server: https://{inputs['address']}:6443}}}}]\n")
        return outs
    if typ in ("aws:ec2/vpc:Vpc", "aws:ec2/subnet:Subnet", "aws:iam/role:Role"):
        return {"arn": f"arn:aws:test:::{name}", "name": inputs.get("name", name)}
    return {}


class RecordingMocks(pulumi.runtime.Mocks):
    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        state = dict(args.inputs)
        state.update(computed_outputs(args.typ, args.name, args.inputs))
        return [f"{args.name}-id", state]

    def call(self, args: pulumi.runtime.MockCallArgs):
        return {}


class RecordingMonitor(MockMonitor):
    def __init__(self, mocks: pulumi.runtime.Mocks) -> None:
        super().__init__(mocks)
        self.registrations: list[Registration] = []

    def RegisterResource(self, request):
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            from pulumi.runtime import rpc

            secret_inputs: set[str] = set()
            inputs = unwrap_secrets(rpc.deserialize_properties(request.object), "", secret_inputs)
            self.registrations.append(Registration(
                urn=response.urn, typ=request.type, name=request.name,
                inputs=inputs, parent=request.parent,
                dependencies=list(request.dependencies), secret_outputs=list(request.additionalSecretOutputs),
                provider=request.provider, secret_inputs=secret_inputs,
            ))
        return response


@dataclass
class ProgramRun:
    registrations: list[Registration]
    values: dict[str, Any] = field(default_factory=dict)

    def of_type(self, typ: str) -> list[Registration]:
        return [r for r in self.registrations if r.typ == typ]

    def one(self, typ: str, name: str | None = None) -> Registration:
        found = [r for r in self.of_type(typ) if name is None or r.name == name or r.inputs.get("metadata", {}).get("name") == name]
        assert len(found) == 1, f"expected one {typ} {name or ''}, found {[r.name for r in found]}"
        return found[0]

    def by_urn(self, urn: str) -> Registration:
        return next(r for r in self.registrations if r.urn == urn)

    def waits_for(self, later: Registration, earlier: Registration) -> bool:
        """Whether `later` depends on `earlier`, directly or through other resources."""
        seen: set[str] = set()
        todo = list(later.dependencies)
        while todo:
            urn = todo.pop()
            if urn == earlier.urn:
                return True
            if urn not in seen:
                seen.add(urn)
                todo.extend(self.by_urn(urn).dependencies)
        return False


def run_program(program: Callable[[], dict[str, Any]], *, config: dict[str, Any] | None = None,
                secret_keys: tuple[str, ...] = ()) -> ProgramRun:
    """Run `program` (returns a dict of Outputs/values to resolve) under mocks with the given stack config."""
    mocks = RecordingMocks()
    monitor = RecordingMonitor(mocks)
    pulumi.runtime.set_mocks(mocks, project="digital-worker", stack="test", preview=False, monitor=monitor)
    pulumi.runtime.set_all_config(
        {f"digital-worker:{k}": v if isinstance(v, str) else json.dumps(v) for k, v in (config or {}).items()},
        [f"digital-worker:{k}" for k in secret_keys],
    )
    run = ProgramRun(monitor.registrations)

    @pulumi.runtime.test
    def body():
        wanted = program() or {}
        keys = list(wanted)

        def keep(values):
            run.values.update(dict(zip(keys, values)))

        return pulumi.Output.all(*[wanted[k] for k in keys]).apply(keep)

    body()
    return run


def is_secret(output: pulumi.Output) -> bool:
    from pulumi.runtime.sync_await import _sync_await

    return _sync_await(output.is_secret())
