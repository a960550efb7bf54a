#!/usr/bin/env bash
# The Sluice demo: builds the lab (relay, connector, private web server and DNS zone, agent with a TUN device,
# each in its own network namespace), fetches a page by hostname through the tunnel, shows the path the
# packets took, and takes the lab down again.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
bin=target/release/sluice
trap '$bin lab down --prefix demo- >/dev/null 2>&1 || true' EXIT

echo; echo "== sluice lab up: relay, connector, agent and services in namespaces demo-*"
$bin lab up --prefix demo-
echo
echo "== The agent's namespace has no route to the private network except the tunnel:"
ip -n demo-agent route
echo
echo "== dig wiki.corp.internal from demo-agent: the agent answers with a synthetic address"
ip netns exec demo-agent dig +short wiki.corp.internal
echo
echo "== curl http://wiki.corp.internal/ from demo-agent: through the tunnel; the connector resolves"
echo "   the name in the private zone and dials the real server"
ip netns exec demo-agent curl -sS --max-time 5 http://wiki.corp.internal/
sleep 1
echo
echo "== sluice status: the tunnel came up through the relay, then went direct (hole punching;"
echo "   here agent and connector share a network, behind NATs see docs/direct.md)"
$bin status --socket /run/sluice-lab/demo-/agent.sock
echo
echo "== What the roles logged:"
for r in agent relay connector; do
  echo "-- $r"; grep -E 'tunnel|connected|handshake done|sees us' /run/sluice-lab/demo-/$r.log | head -n 7
done
echo "-- the connector's audit log (every flow decision)"
tail -n 2 /run/sluice-lab/demo-/connector-audit.jsonl
echo
echo "== Stopping the agent: the private service becomes unreachable from demo-agent"
kill "$(cat /run/sluice-lab/demo-/agent.pid)"; sleep 1
if ip netns exec demo-agent curl -sS --max-time 2 http://198.51.100.10/ >/dev/null 2>&1; then
  echo "unexpected: the page is still reachable without the agent"; exit 1
else
  echo "unreachable without the agent, as it should be"
fi
echo
echo "== sluice lab down"
$bin lab down --prefix demo-
trap - EXIT
