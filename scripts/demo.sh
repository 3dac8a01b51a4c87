#!/usr/bin/env bash
# The main job, end to end: four hosts share one CXL pool; the Beluga store is deployed
# into them; a functional and a fault-injection scenario run; the reports say what happened.
set -euo pipefail
cd "$(dirname "$0")/.."
BT=${BT:-.venv/bin/beluga-testbed}
NAME=demo
REPORTS=${REPORTS:-reports/demo-$(date +%Y%m%d-%H%M%S)}
trap '$BT down "$NAME" || true' EXIT

$BT topology show 4hosts-1switch
$BT up 4hosts-1switch --name "$NAME"
$BT status "$NAME"
$BT pool "$NAME"
echo "--- every host sees the four memory devices (serial numbers from the topology):"
$BT exec "$NAME" --all -- 'cxl list -M | grep -o "\"serial\":[0-9]*" | sort | tr "\n" " "; echo'

status=0
$BT run functional/cross-host-put-get --testbed "$NAME" --report-dir "$REPORTS/cross-host-put-get" || status=1
$BT run faults/poison --testbed "$NAME" --report-dir "$REPORTS/poison" || status=1
echo
echo "Reports (JSON and HTML, with a timeline of steps and faults):"
for r in "$REPORTS"/*/report.html; do
    verdict=$(python3 -c 'import json,sys; print("passed" if json.load(open(sys.argv[1]))["passed"] else "FAILED")' "${r%.html}.json")
    echo "  $verdict  $(realpath "$r")"
done
exit $status
