#!/usr/bin/env python3
"""Validates serin's Kubernetes manifests; called by deploy/ci.sh.

- Every object in the given files is checked against the Kubernetes OpenAPI schema
  (kubernetes-validate, strict: unknown fields are errors), for the oldest and the newest
  Kubernetes version the chart supports. `List` kinds are validated item by item.
- Pod specs get the checks a schema cannot do: port names unique and at most 15
  characters, and every probe or hook that names a port names one of its container.
- With --chart, the Helm chart is linted (strict) and rendered with Helm's own engine, for
  several sets of values, and every rendered object is validated the same way; value sets
  the chart must refuse are rendered too, and must fail with the expected message. The
  engine is the `helm` binary when one is on PATH, else the helm-python-sdk wheel from PyPI
  (it bundles Helm's Go SDK), so no download outside the package registries is needed.
- CustomResourceDefinitions (serin's SerinRollout, from the files and the chart's crds/)
  are validated as objects like any other, then checked for what the API server requires of
  them beyond the schema (structural schema, list-map keys, printer columns, names). Every
  custom resource of a known CRD is validated against that CRD's openAPIV3Schema with
  `jsonschema` (Draft 4, the dialect OpenAPI 3.0 extends), strictly: `nullable` is honoured,
  and unknown fields fail as `kubectl apply --validate=strict` fails them. A deliberately
  broken SerinRollout must fail it, so the check cannot pass vacuously.
- RBAC: serin ships no cluster-wide role, no wildcard, and a name on every rule whose verb
  Kubernetes can restrict by name. A Role annotated `serin.dev/fleet: NAME` must grant
  exactly what a fleet member calls, for NAME. Within each file (or rendered chart), every
  RoleBinding's Role must be there, and every fleet pod (env SERIN_FLEET) must get its env
  in expansion order, keep its token, and run as an account bound to its fleet's Role.

Reading YAML with PyYAML (YAML 1.1, like kubectl) also catches values that a YAML 1.2
writer left unquoted, such as `yes`, which kubectl would read as a bool.

The last line is "validate: N passed, M failed"; the exit status is non-zero on any failure.
"""

import argparse
import contextlib
import copy
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import jsonschema
import kubernetes_validate
import yaml

KUBE_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]

# Custom resources have no upstream schema: check the fields serin's chart sets.
CRD_REQUIRED = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ["metadata.name", "spec.selector", "spec.endpoints"],
}

# Value sets the chart is rendered with, each covering different templates.
CHART_VALUES = {
    "defaults": {},
    "everything": {
        "injector": {"enabled": True, "outbound": True},
        "standalone": {
            "autoscaling": {"enabled": True},
            "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
            "env": [{"name": "SERIN_LOG", "value": "debug"}],
            "tolerations": [{"operator": "Exists"}],
        },
        "podAnnotations": {"example.com/team": "web"},
    },
    "injector-only-existing-tls": {
        "standalone": {"enabled": False},
        "adminToken": {"existingSecret": "my-token"},
        "injector": {
            "enabled": True,
            "tls": {"generate": False, "existingSecret": "my-tls", "caBundle": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"},
        },
    },
    # Fleet mode for the standalone replicas, with the SerinRollout made by the chart.
    "fleet": {
        "standalone": {"autoscaling": {"enabled": True}},
        "fleet": {
            "name": "checkout.v2",
            "rollout": {
                "rollout": {"steps": [5, 25, 50, 100], "hold": "60s", "minRequestsPerStep": 200},
                "paused": False,
                "judge": {"max_error_rate": 0.02, "max_p95": "800ms", "min_latency_shift": 1.5,
                          "min_requests": 50, "max_consecutive_errors": 10},
            },
        },
    },
    # Only the RBAC (and the SerinRollout) for pods the injection webhook made members.
    "fleet-rbac-only": {
        "standalone": {"enabled": False},
        "fleet": {
            "name": "hello",
            "serviceAccount": {"create": False, "name": "hello"},
            "rollout": {"canaryWeight": 10},
        },
    },
}

# Value sets the chart must refuse, and a part of the message it must give.
CHART_REFUSALS = {
    "fleet-bad-name": ({"fleet": {"name": "Hello_World"}}, 'fleet.name "Hello_World" is not a valid SerinRollout name'),
    "fleet-rollout-without-name": ({"fleet": {"rollout": {"canaryWeight": 5}}}, "fleet.rollout needs fleet.name"),
    "fleet-weight-and-rollout": (
        {"fleet": {"name": "web", "rollout": {"canaryWeight": 5, "rollout": {"steps": [50, 100]}}}},
        "give canaryWeight or rollout, not both",
    ),
    "fleet-existing-account-unnamed": (
        {"fleet": {"name": "web", "serviceAccount": {"create": False}}},
        "fleet.serviceAccount.name is required",
    ),
}

# What a fleet member calls (the runtime's contract), for SerinRollout `name`.
def fleet_rules(name):
    return [
        {"apiGroups": ["serin.dev"], "resources": ["serinrollouts"], "resourceNames": [name],
         "verbs": ["get", "list", "watch", "patch"]},
        {"apiGroups": ["serin.dev"], "resources": ["serinrollouts/status"], "resourceNames": [name],
         "verbs": ["patch"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [f"serin-{name}"],
         "verbs": ["get", "update"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [f"serin-{name}-members"],
         "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
    ]


# Verbs Kubernetes cannot restrict with resourceNames (the name is not known when it checks).
UNNAMED_VERBS = {"create", "deletecollection"}

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class Report:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def ok(self, what):
        self.passed += 1
        print(f"ok   {what}")

    def fail(self, what, why):
        self.failed += 1
        print(f"FAIL {what}: {why}")


def objects(doc, where):
    """Yields (label, object), expanding List kinds."""
    if doc is None:
        return
    if not isinstance(doc, dict):
        yield where, doc
        return
    kind = doc.get("kind", "")
    if kind.endswith("List") and isinstance(doc.get("items"), list):
        for i, item in enumerate(doc["items"]):
            yield from objects(item, f"{where} {kind} item {i + 1}")
        return
    meta = doc.get("metadata") or {}
    yield f"{where} {kind} {meta.get('namespace', '')}/{meta.get('name', '')}", doc


def pod_spec(obj):
    kind = obj.get("kind")
    if kind == "Pod":
        return obj.get("spec")
    if kind == "CronJob":
        return (((obj.get("spec") or {}).get("jobTemplate") or {}).get("spec") or {}).get("template", {}).get("spec")
    return ((obj.get("spec") or {}).get("template") or {}).get("spec")


def pod_problems(spec):
    problems = []
    if not isinstance(spec, dict):
        return problems
    seen = {}
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or []:
            names = set()
            for p in c.get("ports") or []:
                name = p.get("name")
                if name is None:
                    continue
                names.add(name)
                if len(name) > 15:
                    problems.append(f"port name {name!r} is longer than 15 characters")
                if name in seen:
                    problems.append(f"port name {name!r} used by {seen[name]!r} and {c.get('name')!r}")
                seen[name] = c.get("name")
            handlers = [c.get(p) for p in ("livenessProbe", "readinessProbe", "startupProbe")]
            handlers += [(c.get("lifecycle") or {}).get(h) for h in ("postStart", "preStop")]
            for h in handlers:
                for action in ("httpGet", "tcpSocket"):
                    port = ((h or {}).get(action) or {}).get("port")
                    if isinstance(port, str) and port not in names:
                        problems.append(f"container {c.get('name')!r}: {action} names port {port!r}, which it does not have")
    return problems


# === custom resources ===


def openapi_to_jsonschema(node, root=False):
    """An openAPIV3Schema node as strict JSON Schema (Draft 4): `nullable` becomes a null
    type, and objects with `properties` refuse other keys unless the schema keeps unknown
    fields. Kubernetes' `x-kubernetes-*` keys are left for the structural checks."""
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "properties":
            out[k] = {name: openapi_to_jsonschema(p) for name, p in v.items()}
        elif k in ("items", "additionalProperties", "not") and isinstance(v, dict):
            out[k] = openapi_to_jsonschema(v)
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = [openapi_to_jsonschema(x) for x in v]
        elif k == "nullable":
            continue
        else:
            out[k] = v
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if root:
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if "properties" in out and "additionalProperties" not in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def walk_schema(node, path, visit):
    """Calls visit(path, node) for every schema node under an openAPIV3Schema."""
    if not isinstance(node, dict):
        return
    visit(path, node)
    for name, p in (node.get("properties") or {}).items():
        walk_schema(p, f"{path}.{name}", visit)
    if isinstance(node.get("items"), dict):
        walk_schema(node["items"], f"{path}[]", visit)
    if isinstance(node.get("additionalProperties"), dict):
        walk_schema(node["additionalProperties"], f"{path}.*", visit)


def crd_problems(crd):
    """What the API server requires of a CRD beyond the OpenAPI schema of the CRD object."""
    problems = []
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    expected = f"{names.get('plural')}.{spec.get('group')}"
    if (crd.get("metadata") or {}).get("name") != expected:
        problems.append(f"metadata.name must be {expected!r}")
    versions = spec.get("versions") or []
    if sum(1 for v in versions if v.get("storage")) != 1:
        problems.append("exactly one version must be the storage version")
    for v in versions:
        where = f"version {v.get('name')}"
        schema = (v.get("schema") or {}).get("openAPIV3Schema")
        if not isinstance(schema, dict):
            problems.append(f"{where}: no openAPIV3Schema")
            continue

        def structural(path, node, where=where):
            typed = node.get("type") or node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
            if not typed:
                problems.append(f"{where}: {path} has no type (not a structural schema)")
            if node.get("type") == "array" and not isinstance(node.get("items"), dict):
                problems.append(f"{where}: {path} is an array without items")
            if "properties" in node and node.get("type") != "object":
                problems.append(f"{where}: {path} has properties but is not an object")
            if node.get("x-kubernetes-list-type") == "map":
                items = node.get("items") or {}
                for key in node.get("x-kubernetes-list-map-keys") or []:
                    if key not in (items.get("properties") or {}):
                        problems.append(f"{where}: {path}: list-map key {key!r} is not a property of the items")
                    elif key not in (items.get("required") or []) and "default" not in items["properties"][key]:
                        problems.append(f"{where}: {path}: list-map key {key!r} must be required or have a default")
                if not node.get("x-kubernetes-list-map-keys"):
                    problems.append(f"{where}: {path}: x-kubernetes-list-type map without x-kubernetes-list-map-keys")

        walk_schema(schema, "", structural)
        if (v.get("subresources") or {}).get("status") is not None and "status" not in (schema.get("properties") or {}):
            problems.append(f"{where}: a status subresource but no status in the schema")
        for col in v.get("additionalPrinterColumns") or []:
            path = col.get("jsonPath", "")
            node = {"properties": {"metadata": {"properties": {"creationTimestamp": {}, "name": {}, "namespace": {}}}}}
            node["properties"].update(schema.get("properties") or {})
            for part in path.strip(".").split("."):
                node = (node.get("properties") or {}).get(part) if isinstance(node, dict) else None
            if node is None:
                problems.append(f"{where}: printer column {col.get('name')!r}: {path} is not in the schema")
    try:
        for v in versions:
            jsonschema.Draft4Validator.check_schema(openapi_to_jsonschema(v["schema"]["openAPIV3Schema"], root=True))
    except (jsonschema.SchemaError, KeyError, TypeError) as e:
        problems.append(f"openAPIV3Schema is not a valid JSON Schema: {getattr(e, 'message', e)}")
    return problems


class Crds:
    """The CRDs found in the inputs, by (apiVersion, kind) of their resources."""

    def __init__(self):
        self.by_kind = {}

    def add(self, crd):
        spec = crd.get("spec") or {}
        kind = (spec.get("names") or {}).get("kind")
        for v in spec.get("versions") or []:
            schema = (v.get("schema") or {}).get("openAPIV3Schema")
            if isinstance(schema, dict):
                api = f"{spec.get('group')}/{v.get('name')}"
                validator = jsonschema.Draft4Validator(openapi_to_jsonschema(schema, root=True))
                self.by_kind[(api, kind)] = (validator, spec.get("scope"))

    def problems(self, obj):
        validator, scope = self.by_kind[(obj.get("apiVersion"), obj.get("kind"))]
        problems = []
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.path)):
            path = "/".join(str(p) for p in e.path)
            problems.append(f"CRD schema: {path or '(root)'}: {e.message}")
        meta = obj.get("metadata") or {}
        name = meta.get("name", "")
        if not (isinstance(name, str) and len(name) <= 253 and DNS1123_SUBDOMAIN.match(name)):
            problems.append(f"metadata.name {name!r} is not a DNS-1123 subdomain")
        if scope == "Cluster" and meta.get("namespace"):
            problems.append("a cluster-scoped resource has a namespace")
        return problems


# A SerinRollout that a strict check must refuse: a misspelt key, a string weight, an
# unknown judge key, and a step that is not a number.
BROKEN_SERINROLLOUT = {
    "apiVersion": "serin.dev/v1alpha1",
    "kind": "SerinRollout",
    "metadata": {"name": "broken", "namespace": "demo"},
    "spec": {
        "canaryweight": 10,
        "canaryWeight": "10",
        "judge": {"maxErrorRate": 0.05},
        "rollout": {"steps": [5, "all"]},
    },
}


def self_check_crd_schema(crds, report):
    key = ("serin.dev/v1alpha1", "SerinRollout")
    if key not in crds.by_kind:
        report.fail("crd-schema self-check", "no SerinRollout CRD among the inputs")
        return
    found = " ".join(crds.problems(BROKEN_SERINROLLOUT))
    missing = [m for m in ("'canaryweight' was unexpected", "'10' is not of type", "'maxErrorRate' was unexpected", "'all' is not of type") if m not in found]
    if missing:
        report.fail("crd-schema self-check", f"a broken SerinRollout was not refused for {missing}: {found}")
    else:
        report.ok("crd-schema self-check: a broken SerinRollout is refused")


# === RBAC and fleet pods ===


def rule_key(rule):
    return tuple(tuple(sorted(rule.get(k) or [])) for k in ("apiGroups", "resources", "resourceNames", "verbs", "nonResourceURLs"))


def rbac_problems(obj):
    kind = obj.get("kind")
    if kind in ("ClusterRole", "ClusterRoleBinding"):
        return [f"serin ships no cluster-wide RBAC, and this is a {kind}"]
    if kind != "Role":
        return []
    problems = []
    rules = obj.get("rules") or []
    for i, rule in enumerate(rules):
        for k in ("apiGroups", "resources", "verbs", "resourceNames"):
            if any("*" in str(x) for x in rule.get(k) or []):
                problems.append(f"rules[{i}].{k} has a wildcard")
        named = set(rule.get("verbs") or []) - UNNAMED_VERBS
        if named and not rule.get("resourceNames"):
            problems.append(f"rules[{i}] grants {sorted(named)} without resourceNames")
    fleet = ((obj.get("metadata") or {}).get("annotations") or {}).get("serin.dev/fleet")
    if fleet is not None:
        want = sorted(rule_key(r) for r in fleet_rules(fleet))
        if sorted(rule_key(r) for r in rules) != want:
            problems.append(f"the rules are not exactly a fleet member's for {fleet!r}: {json.dumps(rules)}")
    return problems


def env_of(container):
    return [e for e in container.get("env") or [] if isinstance(e, dict)]


def fleet_pod_problems(obj, objs):
    """For a pod (or template) with a fleet member: its env, its token, and its RBAC among
    `objs`, the other objects of the same file or rendered chart."""
    spec = pod_spec(obj)
    if not isinstance(spec, dict):
        return None
    members = [c for c in spec.get("containers") or [] if any(e.get("name") == "SERIN_FLEET" for e in env_of(c))]
    if not members:
        return None
    problems = []
    namespace = (obj.get("metadata") or {}).get("namespace")
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    if spec.get("automountServiceAccountToken") is False:
        problems.append("automountServiceAccountToken is false: a fleet member needs its token")
    fleets = set()
    for c in members:
        env = env_of(c)
        names = [e.get("name") for e in env]
        fleet_value = next(e.get("value", "") for e in env if e.get("name") == "SERIN_FLEET")
        for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", fleet_value):
            if ref not in names[: names.index("SERIN_FLEET")]:
                problems.append(f"container {c.get('name')!r}: SERIN_FLEET uses $({ref}), which is not defined before it")
        member = next((e for e in env if e.get("name") == "SERIN_FLEET_MEMBER"), None)
        if member is not None and ((member.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath") != "metadata.name":
            problems.append(f"container {c.get('name')!r}: SERIN_FLEET_MEMBER is not the pod name (fieldRef metadata.name)")
        if "/" not in fleet_value:
            problems.append(f"container {c.get('name')!r}: SERIN_FLEET {fleet_value!r} is not NAMESPACE/NAME")
        fleets.add(fleet_value.rsplit("/", 1)[-1])
    for fleet in sorted(fleets):
        roles = {
            (o["metadata"].get("namespace"), o["metadata"].get("name"))
            for o in objs
            if o.get("kind") == "Role" and ((o.get("metadata") or {}).get("annotations") or {}).get("serin.dev/fleet") == fleet
        }
        bound = any(
            o.get("kind") == "RoleBinding"
            and (o.get("metadata") or {}).get("namespace") == namespace
            and (namespace, (o.get("roleRef") or {}).get("name")) in roles
            and any(
                s.get("kind") == "ServiceAccount" and s.get("name") == account and s.get("namespace", namespace) == namespace
                for s in o.get("subjects") or []
            )
            for o in objs
        )
        if not bound:
            problems.append(f"ServiceAccount {account!r} is not bound to a Role for fleet {fleet!r} in this file")
    return problems


def self_check_rbac(report):
    """The RBAC and fleet checks must refuse a broken fleet, so they cannot pass vacuously."""
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "web", "namespace": "shop", "annotations": {"serin.dev/fleet": "web"}},
            "rules": fleet_rules("web")[:3] + [{"apiGroups": ["coordination.k8s.io"], "resources": ["*"], "verbs": ["create", "delete"]}]}
    cluster = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "x"}, "rules": []}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "shop"},
           "spec": {"serviceAccountName": "web", "containers": [{"name": "serin", "env": [
               {"name": "SERIN_FLEET", "value": "$(SERIN_POD_NAMESPACE)/web"},
               {"name": "SERIN_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
               {"name": "SERIN_FLEET_MEMBER", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]}]}}
    found = " ".join(rbac_problems(role) + rbac_problems(cluster) + (fleet_pod_problems(pod, [role]) or []))
    expected = ["has a wildcard", "without resourceNames", "not exactly a fleet member's", "no cluster-wide RBAC",
                "not defined before it", "SERIN_FLEET_MEMBER is not the pod name", "is not bound to a Role"]
    missing = [m for m in expected if m not in found]
    if missing:
        report.fail("rbac self-check", f"a broken fleet was not refused for {missing}: {found}")
    else:
        report.ok("rbac self-check: a broken fleet Role, a ClusterRole and a broken fleet pod are refused")


def validate_set(where, objs, report):
    """Checks across the objects of one file or rendered chart."""
    named = [o for _, o in objs if isinstance(o, dict)]
    roles = {((o.get("metadata") or {}).get("namespace"), (o.get("metadata") or {}).get("name")) for o in named if o.get("kind") == "Role"}
    for label, obj in objs:
        if not isinstance(obj, dict):
            continue
        if obj.get("kind") == "RoleBinding":
            ref = obj.get("roleRef") or {}
            ns = (obj.get("metadata") or {}).get("namespace")
            if ref.get("kind") != "Role" or (ns, ref.get("name")) not in roles:
                report.fail(f"{label} roleRef", f"{ref.get('kind')} {ref.get('name')!r} is not a Role of this file")
            else:
                report.ok(f"{label} roleRef")
        problems = fleet_pod_problems(obj, named)
        if problems is None:
            continue
        if problems:
            report.fail(f"{label} fleet member", "; ".join(problems))
        else:
            report.ok(f"{label} fleet member")


def validate_object(label, obj, report, crds):
    if not isinstance(obj, dict):
        report.fail(label, "not a mapping")
        return
    key = (obj.get("apiVersion"), obj.get("kind"))
    problems = []
    if key in crds.by_kind:
        problems += crds.problems(obj)
    elif key in CRD_REQUIRED:
        for path in CRD_REQUIRED[key]:
            node = obj
            for part in path.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node in (None, {}, []):
                problems.append(f"{path} is missing")
    else:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                problems.append(f"k8s {version}: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"k8s {version}: no schema: {e}")
    if key == ("apiextensions.k8s.io/v1", "CustomResourceDefinition"):
        problems += crd_problems(obj)
    problems += rbac_problems(obj)
    problems += pod_problems(pod_spec(obj))
    if problems:
        report.fail(label, "; ".join(problems))
    else:
        report.ok(label)


def load_text(text, where, report):
    """[(label, object)] of a multi-document YAML text; None (and a failure) if not YAML."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        report.fail(where, f"not YAML: {e}")
        return None
    return [o for d in docs for o in objects(d, where)]


def validate_objects(where, objs, report, crds):
    for label, obj in objs:
        validate_object(label, obj, report, crds)
    validate_set(where, objs, report)


@contextlib.contextmanager
def quiet_stderr():
    """Silences file descriptor 2, where Helm's Go engine logs every `fail` it executes."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w", encoding="utf-8") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def render_chart(chart, values, name, namespace):
    """Returns {template path: text}, and lint findings (severity >= warning)."""
    helm = shutil.which("helm")
    if helm:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(values, f)
        try:
            lint = subprocess.run([helm, "lint", "--strict", chart, "-f", f.name], capture_output=True, text=True)
            findings = [] if lint.returncode == 0 else [lint.stdout + lint.stderr]
            template = subprocess.run(
                [helm, "template", name, chart, "-n", namespace, "-f", f.name],
                capture_output=True, text=True,
            )
            if template.returncode != 0:
                raise RuntimeError(template.stderr.strip())
            out = template.stdout
        finally:
            os.unlink(f.name)
        return {"rendered": out}, findings
    import helm_python

    lint = helm_python.lint(chart, values, strict=True, namespace=namespace)
    findings = [f"{m['path']}: {m['error']}" for m in lint.get("messages", []) if m.get("severity", 0) >= 2]
    findings += lint.get("errors") or []
    rendered = helm_python.Chart.load(chart).render(values, name=name, namespace=namespace, is_install=True)
    return {k: v for k, v in rendered.items() if not k.endswith("NOTES.txt")}, findings


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*")
    ap.add_argument("--chart", help="Helm chart directory to lint, render and validate")
    ap.add_argument("--out", help="directory to write the rendered chart to")
    args = ap.parse_args()
    report = Report()

    # The chart's crds/ are installed with it: its custom resources are checked against them.
    paths = list(args.files)
    if args.chart:
        paths += [p for p in sorted(glob.glob(os.path.join(args.chart, "crds", "*.yaml"))) if p not in paths]
    loaded = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            objs = load_text(f.read(), path, report)
        if objs is not None:
            loaded.append((path, objs))
    crds = Crds()
    for _, objs in loaded:
        for _, obj in objs:
            if isinstance(obj, dict) and (obj.get("apiVersion"), obj.get("kind")) == ("apiextensions.k8s.io/v1", "CustomResourceDefinition"):
                crds.add(copy.deepcopy(obj))
    self_check_crd_schema(crds, report)
    self_check_rbac(report)
    for path, objs in loaded:
        validate_objects(path, objs, report, crds)

    if args.chart:
        for case, values in CHART_VALUES.items():
            try:
                rendered, findings = render_chart(args.chart, values, "serin", "serin-system")
            except Exception as e:  # noqa: BLE001 - any engine failure is a failed check
                report.fail(f"chart[{case}]", f"render failed: {e}")
                continue
            if findings:
                report.fail(f"chart[{case}] lint", "; ".join(findings))
            else:
                report.ok(f"chart[{case}] lint")
            text = "\n---\n".join(rendered[k] for k in sorted(rendered))
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, f"{case}.yaml"), "w", encoding="utf-8") as f:
                    f.write(text)
            objs = load_text(text, f"chart[{case}]", report)
            if objs is not None:
                validate_objects(f"chart[{case}]", objs, report, crds)
        for case, (values, message) in CHART_REFUSALS.items():
            try:
                with quiet_stderr():
                    render_chart(args.chart, values, "serin", "serin-system")
            except Exception as e:  # noqa: BLE001 - the refusal is what is checked
                if message in str(e):
                    report.ok(f"chart[{case}] refused")
                else:
                    report.fail(f"chart[{case}]", f"refused, but without {message!r}: {e}")
                continue
            report.fail(f"chart[{case}]", "rendered values the chart must refuse")

    print(f"validate: {report.passed} passed, {report.failed} failed")
    return 1 if report.failed or report.passed == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
