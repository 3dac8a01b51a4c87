#!/usr/bin/env bash
# The main job, end to end: four hosts share one CXL pool; what host0 stores, host3 loads.
set -euo pipefail
cd "$(dirname "$0")/.."
BT=${BT:-.venv/bin/beluga-testbed}
NAME=demo
trap '$BT down "$NAME" || true' EXIT

$BT topology show 4hosts-1switch
$BT up 4hosts-1switch --name "$NAME"
$BT status "$NAME"
$BT pool "$NAME"
echo "--- every host sees the switch and the four memory devices (serial numbers from the topology):"
$BT exec "$NAME" --all -- 'cxl list -M | grep -o "\"serial\":[0-9]*" | tr "\n" " "; echo'
echo "--- host0 stores a message in the pool through /dev/dax; host3 loads it:"
$BT exec "$NAME" host0 -- python3 -c '
import mmap, os
m = mmap.mmap(os.open("/dev/dax0.0", os.O_RDWR), 2 << 20)
msg = b"hello from host0 via CXL"
m[4096:4096 + len(msg)] = msg
print("host0 wrote:", msg.decode())'
$BT exec "$NAME" host3 -- python3 -c '
import mmap, os
m = mmap.mmap(os.open("/dev/dax0.0", os.O_RDWR), 2 << 20)
print("host3 read: ", m[4096:4096 + 24].decode())'
