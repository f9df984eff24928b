#!/usr/bin/env bash
# Installs the serin injection webhook from injector.yaml: makes a CA and a serving
# certificate for serin-injector.serin-system.svc with openssl, stores them in the Secret
# serin-injector-tls, and applies the manifests with the CA as caBundle.
# Needs kubectl (pointed at the cluster) and openssl. Re-running rotates the certificate.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
svc=serin-injector
ns=serin-system
days="${SERIN_CERT_DAYS:-825}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

openssl req -x509 -newkey rsa:2048 -nodes -days "$days" -subj "/CN=serin-injector-ca" \
  -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=$svc.$ns.svc" \
  -keyout "$work/tls.key" -out "$work/tls.csr" 2>/dev/null
printf 'subjectAltName=DNS:%s,DNS:%s.%s,DNS:%s.%s.svc\nextendedKeyUsage=serverAuth\n' \
  "$svc" "$svc" "$ns" "$svc" "$ns" > "$work/ext.cnf"
openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial \
  -days "$days" -extfile "$work/ext.cnf" -out "$work/tls.crt" 2>/dev/null

kubectl get namespace "$ns" >/dev/null 2>&1 || kubectl create namespace "$ns"
kubectl -n "$ns" create secret tls serin-injector-tls --cert "$work/tls.crt" --key "$work/tls.key" \
  --dry-run=client -o yaml | kubectl apply -f -
ca_bundle="$(base64 < "$work/ca.crt" | tr -d '\n')"
sed "s|caBundle: \"\"|caBundle: \"$ca_bundle\"|" "$here/injector.yaml" | kubectl apply -f -
kubectl -n "$ns" rollout restart deployment/serin-injector
kubectl -n "$ns" rollout status deployment/serin-injector --timeout=120s
