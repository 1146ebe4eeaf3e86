#!/usr/bin/env bash
# A real Flower deployment on one machine, the way partner sites run it minus the network:
# a SuperLink with TLS and SuperNode authentication, N SuperNodes that each read only their own data folder and
# their own privacy policy (--node-config 'data-path=... policy=...'), then `flwr run` of this app against it.
#
#   bash deploy/loopback.sh                          # default pair, 2 sites, simulations/deployment.toml
#   SCENARIO="simulations/deployment.toml simulations/toy.toml" bash deploy/loopback.sh runs/deploy-toy
#                                                    # toy pair (seconds; what the slow test runs)
#   DROP_SITE=1 SITES=3 SCENARIO="... simulations/site_dropout.toml" bash deploy/loopback.sh runs/drill
#                                                    # kill -9 site 1 after round 1: the run goes on with 2
#   NEGATIVE=1 ... bash deploy/loopback.sh           # also: an unregistered node and one without the CA are refused
# SCENARIO: one or more run-config files, later ones overriding earlier ones. SITE_POLICY: the policy file every
# site uses (default: written below, DP-SGD with ε <= 8 per round, budget 24, nothing released beyond the update,
# num-examples and the ε spent; docs/privacy.md). Each site's ledger lives beside its data.
#
# Needs: openssl, ssh-keygen, and the prepared models + Grad-Transformer (`fedgt provide`, cached) — the server
# loads them; each site loads only the TinyLM.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mkdir -p "${1:-runs/deploy}" && cd "${1:-runs/deploy}" && pwd)
scenarios=${SCENARIO:-simulations/deployment.toml}
n=${SITES:-2}
port=${PORT:-18443}
bin=$root/.venv/bin
export PATH="$bin:$PATH" FLWR_HOME="$work/flwr-home" FLWR_DISABLE_UPDATE_CHECK=1 \
       FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 PYTHONUNBUFFERED=1
mkdir -p "$work/certs" "$work/keys" "$FLWR_HOME"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# 1. The federation's CA and the SuperLink's certificate (SAN localhost / 127.0.0.1).
c=$work/certs
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=fedgt-ca" -keyout "$c/ca.key" -out "$c/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$c/server.key" -out "$c/server.csr" 2>/dev/null
printf "subjectAltName=DNS:localhost,IP:127.0.0.1\n" > "$c/san.ext"
openssl x509 -req -in "$c/server.csr" -CA "$c/ca.crt" -CAkey "$c/ca.key" -CAcreateserial -days 2 \
  -extfile "$c/san.ext" -out "$c/server.pem" 2>/dev/null

# 2. The scenario files merged into one run config, each site's data (here: the simulated organizations, written as
#    JSONL folders), its privacy policy and its SuperNode key.
scenario=$work/scenario.toml
# shellcheck disable=SC2086
"$bin/python" - "$scenario" $scenarios <<'PY'
import sys, tomllib
from fedgt.core.run_config import _flatten
from fedgt.run.flwr_runner import _toml_value
merged = {}
for path in sys.argv[2:]:
    merged.update(_flatten(tomllib.loads(open(path).read())))
open(sys.argv[1], "w").write("".join(f"{k} = {_toml_value(v)}\n" for k, v in merged.items()))
PY
"$bin/fedgt" export-orgs --scenario "$scenario" --orgs "$n" --out "$work/sites"
policy=${SITE_POLICY:-$work/site-policy.toml}
if [ -z "${SITE_POLICY:-}" ]; then
  printf '[policy]\ndp-mode = "dp-sgd"\nmax-epsilon = 8.0\nmax-delta = 1e-5\nbudget = 24.0\nrelease = []\n' > "$policy"
fi
for i in $(seq 0 $((n - 1))); do
  rm -f "$work/keys/site$i" "$work/keys/site$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -f "$work/keys/site$i"
done

# 3. The SuperLink (central server): TLS, only registered SuperNodes may join.
setsid "$bin/flower-superlink" --ssl-ca-certfile "$c/ca.crt" --ssl-certfile "$c/server.pem" \
  --ssl-keyfile "$c/server.key" --enable-supernode-auth --port "$port" > "$work/superlink.log" 2>&1 &
pids+=($!)
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "tls"

[superlink.tls]
address = "127.0.0.1:$port"
root-certificates = "$c/ca.crt"
EOF
for _ in $(seq 1 60); do
  curl -sf --cacert "$c/ca.crt" "https://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 0.5
done

# 4. Register every site's public key, then start its SuperNode with its own data path and policy. (Here every
#    site finds the provider's TinyLM in the shared model cache; a partner site adds tiny-model="/its/copy".)
for i in $(seq 0 $((n - 1))); do
  "$bin/flwr" supernode register "$work/keys/site$i.pub" tls
  setsid "$bin/flower-supernode" --root-certificates "$c/ca.crt" --superlink "127.0.0.1:$port" \
    --auth-supernode-private-key "$work/keys/site$i" --port $((port + 10 + i)) \
    --node-config "data-path=\"$work/sites/org-$i\" policy=\"$policy\"" > "$work/supernode$i.log" 2>&1 &
  pids+=($!)
done

# Negative checks (optional): NEGATIVE=1 starts two SuperNodes that must be refused before the run: one whose key was
# never registered, one that does not trust the federation's CA (no --root-certificates: the system's roots). Each
# must stop on its own (Flower reports exit code 305) without joining; their logs and exit statuses go to negative.log.
if [ -n "${NEGATIVE:-}" ]; then
  rm -f "$work/keys/rogue" "$work/keys/rogue.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -f "$work/keys/rogue"
  set +e
  timeout 120 "$bin/flower-supernode" --root-certificates "$c/ca.crt" --superlink "127.0.0.1:$port" \
    --auth-supernode-private-key "$work/keys/rogue" --port $((port + 8)) \
    --node-config "data-path=\"$work/sites/org-0\" policy=\"$policy\"" > "$work/unregistered.log" 2>&1
  echo "unregistered exit=$?" >> "$work/negative.log"
  timeout 120 "$bin/flower-supernode" --superlink "localhost:$port" \
    --auth-supernode-private-key "$work/keys/site0" --port $((port + 9)) \
    --node-config "data-path=\"$work/sites/org-0\" policy=\"$policy\"" > "$work/no-ca.log" 2>&1
  echo "no-ca exit=$?" >> "$work/negative.log"
  set -e
fi

# Fault drill (optional): DROP_SITE=i kills site i's SuperNode with SIGKILL once round DROP_AFTER_ROUND (default 1)
# is in the run's metrics, as a site that loses power would vanish.
if [ -n "${DROP_SITE:-}" ]; then
  (
    while ! grep -q "\"round\": ${DROP_AFTER_ROUND:-1}," "$work/run/metrics.jsonl" 2>/dev/null; do sleep 0.5; done
    kill -KILL -- "-${pids[$((DROP_SITE + 1))]}" && echo "SIGKILL site $DROP_SITE after round ${DROP_AFTER_ROUND:-1}" \
      >> "$work/faults.log"
  ) &
  watcher=$!
fi

# 5. Run the app: the server waits for the N sites, runs the rounds, writes output.dir.
overrides=$("$bin/python" - "$scenario" "$n" "$work/run" <<'PY'
import sys, tomllib
from fedgt.core.run_config import _flatten
from fedgt.run.flwr_runner import run_config_arg
cfg = _flatten(tomllib.loads(open(sys.argv[1]).read()))
cfg.update({"federation.num-organizations": int(sys.argv[2]), "output.dir": sys.argv[3],
            "eval.org-tests": False, "eval.ceiling": False})
print(run_config_arg(cfg))
PY
)
"$bin/flwr" run . tls --stream --run-config "$overrides"
if [ -n "${watcher:-}" ]; then kill "$watcher" 2>/dev/null || true; fi
test -f "$work/run/results.md" && cat "$work/run/results.md"
