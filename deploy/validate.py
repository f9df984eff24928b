#!/usr/bin/env python3
"""Validates serin's Kubernetes manifests; called by deploy/ci.sh.

- Every object in the given files is checked against the Kubernetes OpenAPI schema
  (kubernetes-validate, strict: unknown fields are errors), for the oldest and the newest
  Kubernetes version the chart supports. `List` kinds are validated item by item.
- Pod specs get the checks a schema cannot do: port names unique and at most 15
  characters, and every probe or hook that names a port names one of its container.
- With --chart, the Helm chart is linted (strict) and rendered with Helm's own engine, for
  several sets of values, and every rendered object is validated the same way. The engine
  is the `helm` binary when one is on PATH, else the helm-python-sdk wheel from PyPI (it
  bundles Helm's Go SDK), so no download outside the package registries is needed.

Reading YAML with PyYAML (YAML 1.1, like kubectl) also catches values that a YAML 1.2
writer left unquoted, such as `yes`, which kubectl would read as a bool.

The last line is "validate: N passed, M failed"; the exit status is non-zero on any failure.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

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
}


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


def validate_object(label, obj, report):
    if not isinstance(obj, dict):
        report.fail(label, "not a mapping")
        return
    key = (obj.get("apiVersion"), obj.get("kind"))
    problems = []
    if key in CRD_REQUIRED:
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
    problems += pod_problems(pod_spec(obj))
    if problems:
        report.fail(label, "; ".join(problems))
    else:
        report.ok(label)


def validate_text(text, where, report):
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        report.fail(where, f"not YAML: {e}")
        return
    for label, obj in (o for d in docs for o in objects(d, where)):
        validate_object(label, obj, report)


def render_chart(chart, values, name, namespace):
    """Returns {template path: text}, and lint findings (severity >= warning)."""
    helm = shutil.which("helm")
    if helm:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(values, f)
        try:
            lint = subprocess.run([helm, "lint", "--strict", chart, "-f", f.name], capture_output=True, text=True)
            findings = [] if lint.returncode == 0 else [lint.stdout + lint.stderr]
            out = subprocess.run(
                [helm, "template", name, chart, "-n", namespace, "-f", f.name],
                capture_output=True, text=True, check=True,
            ).stdout
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

    for path in args.files:
        with open(path, encoding="utf-8") as f:
            validate_text(f.read(), path, report)

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
            validate_text(text, f"chart[{case}]", report)

    print(f"validate: {report.passed} passed, {report.failed} failed")
    return 1 if report.failed or report.passed == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
