#!/usr/bin/env bash
# The same SIPp load against sipzone-node and against Kamailio 5.6 (the peer
# baseline in ../shared/peers), back to back in one run, on loopback only.
#
#   bash bench/bench.sh                 # defaults below
#   REG_N=40000 REG_RATE=4000 CALL_N=10000 CPS=500 bash bench/bench.sh
#
# Phases, each against one server at a time on 127.0.0.1:5070 (UDP):
#   reg   REG_N registrations with digest auth (REGISTER, 401, REGISTER+auth, 200)
#         at REG_RATE per second, distinct users;
#   calls CALL_N calls (INVITE/100/180/200/ACK, HOLD_MS, BYE/200) at CPS per
#         second from a SIPp UAC to a SIPp UAS registered as a user at the
#         server (Kamailio: stateful proxy + usrloc + Record-Route, with the
#         peer's uac_rr/uas_rr scenarios; sipzone-node: B2BUA, so every call
#         is two dialogs, with the built-in uac/uas).
# For each phase it prints the calls SIPp counted, the wall time, and the CPU
# time the server used (utime+stime of the server and its children, from
# /proc), then the ratio of CPU per operation, sipzone-node / Kamailio.
# Kamailio runs with the peer config (-A WITH_AUTH, static password) and its
# measured settings (4 UDP workers, 2 GB shm). That config authenticates
# REGISTERs but not INVITEs, so the node runs with
# danger_unauthenticated_calls here to do the same work per call.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SHARED=${SHARED:-$ROOT/../shared}
REG_N=${REG_N:-20000}
REG_RATE=${REG_RATE:-2000}
CALL_N=${CALL_N:-5000}
CPS=${CPS:-250}
HOLD_MS=${HOLD_MS:-100}
OUT=${OUT:-$ROOT/target/bench}
HZ=$(getconf CLK_TCK)
mkdir -p "$OUT"
for p in sipp kamailio python3; do command -v $p >/dev/null || { echo "need $p (apt-get install sip-tester kamailio)"; exit 3; }; done

echo "building sipzone-node (release)"
cargo build --release -q -p zone-node
NODE=$ROOT/target/release/sipzone-node

PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

ticks() {  # utime+stime of a pid and its direct children, in clock ticks
	local total=0 p
	for p in "$1" $(pgrep -P "$1" || true); do
		[ -r /proc/$p/stat ] || continue
		total=$(( total + $(awk '{print $14 + $15}' /proc/$p/stat) ))
	done
	echo $total
}

wait_udp() {  # wait until something answers OPTIONS-less: a bound UDP port
	for _ in $(seq 1 100); do
		[ -n "$(ss -Hlnu "( sport = :$1 )")" ] && return 0
		sleep 0.1
	done
	echo "nothing listening on UDP $1"; exit 3
}

users_csv() {  # users_csv FILE FIRST COUNT PASSWORD-MODE(pw|secret)
	{ echo SEQUENTIAL
	  for u in $(seq "$2" $(( $2 + $3 - 1 ))); do
		if [ "$4" = pw ]; then pw="pw$u"; else pw=secret; fi
		echo "$u;[authentication username=$u password=$pw]"
	  done; } > "$1"
}

stat_of() {  # stat_of CSV -> "successful failed"
	python3 - "$1" <<'PY'
import sys
rows=[l.rstrip('\n').split(';') for l in open(sys.argv[1]) if l.strip()]
h=rows[0]; last=rows[-1]
print(last[h.index('SuccessfulCall(C)')], last[h.index('FailedCall(C)')])
PY
}

start_server() {  # start_server NAME -> sets SRV_PID
	local name=$1
	if [ "$name" = kamailio ]; then
		kamailio -f "$SHARED/peers/kamailio/kamailio.cfg" -DD -E -m 2048 -M 16 -Y "$OUT/kam-run" \
			-A CHILDREN=4 -A TCP_CHILDREN=4 -A "CTL_SOCK=\"unix:$OUT/kam-ctl.sock\"" -A WITH_AUTH \
			>"$OUT/kamailio.log" 2>&1 &
	else
		cat >"$OUT/node.toml" <<TOML
[node]
id = "bench"
data_dir = "$OUT/node-data"
[sip]
udp = ["127.0.0.1:5070"]
tcp = ["127.0.0.1:5070"]
[auth]
realm = "sipzone.local"
secret_file = "$OUT/node-data/secret"
algorithms = ["MD5", "SHA-256"]
lockout_max_failures = 1000000
# the peer config does not authenticate INVITEs either: same work per call
danger_unauthenticated_calls = true
[log]
format = "json"
level = "warn"
[danger_test_users]
first = 100000
last = $(( 100000 + REG_N + 10 ))
password_prefix = "pw"
TOML
		"$NODE" --config "$OUT/node.toml" >"$OUT/node.log" 2>&1 &
	fi
	SRV_PID=$!
	PIDS+=("$SRV_PID")
	wait_udp 5070
	sleep 1
}

run_sipp() {  # run_sipp LABEL ARGS... -> prints "successful failed wall cpu_s"
	local label=$1; shift
	local st="$OUT/$label.csv" t0 t1 k0 k1
	rm -f "$st"
	k0=$(ticks "$SRV_PID"); t0=$(date +%s.%N)
	timeout 600 sipp "$@" -i 127.0.0.1 -nostdin -buff_size 4194304 -max_socket 10000 \
		-trace_stat -stf "$st" -fd 1 >"$OUT/$label.log" 2>&1 || true
	t1=$(date +%s.%N); k1=$(ticks "$SRV_PID")
	read -r ok failed < <(stat_of "$st")
	python3 -c "print($ok, $failed, round($t1-$t0,2), round(($k1-$k0)/$HZ,2))"
}

declare -A COST
for server in kamailio sipzone-node; do
	echo "=== $server"
	start_server "$server"
	if [ "$server" = kamailio ]; then mode=secret; else mode=pw; fi
	users_csv "$OUT/users-$server.csv" 100000 "$REG_N" "$mode"
	read -r ok failed wall cpu < <(run_sipp "reg-$server" 127.0.0.1:5070 \
		-sf "$ROOT/testkit/scenarios/register_auth.xml" -inf "$OUT/users-$server.csv" \
		-key domain sipzone.local -r "$REG_RATE" -m "$REG_N" -p 5101 -timeout 300s)
	echo "RESULT server=$server phase=reg offered=$REG_N rate=$REG_RATE successful=$ok failed=$failed wall_s=$wall server_cpu_s=$cpu achieved_per_s=$(python3 -c "print(round($ok/$wall))") cpu_us_per_op=$(python3 -c "print(round($cpu*1e6/max($ok,1)))")"
	COST[$server-reg]=$(python3 -c "print($cpu/max($ok,1))")

	# the UAS registers (as a user the node's test range holds) from port
	# 5090, then answers on it
	UAS_USER=$(( 100000 + REG_N + 5 ))
	users_csv "$OUT/uas-$server.csv" "$UAS_USER" 1 "$mode"
	run_sipp "uasreg-$server" 127.0.0.1:5070 -sf "$ROOT/testkit/scenarios/register_auth.xml" \
		-inf "$OUT/uas-$server.csv" -key domain sipzone.local -m 1 -p 5090 >/dev/null
	# Kamailio proxies, so in-dialog requests must follow its Record-Route:
	# the peer's *_rr scenarios (built-in flows plus Route handling). The
	# B2BUA ends each dialog itself: SIPp's built-in uac and uas.
	if [ "$server" = kamailio ]; then
		uas_sc=(-sf "$SHARED/peers/sipp/uas_rr.xml"); uac_sc=(-sf "$SHARED/peers/sipp/uac_rr.xml")
	else
		uas_sc=(-sn uas); uac_sc=(-sn uac)
	fi
	sipp "${uas_sc[@]}" -i 127.0.0.1 -p 5090 -nostdin -buff_size 4194304 -max_socket 10000 \
		>"$OUT/uas-$server.log" 2>&1 &
	UAS=$!; PIDS+=("$UAS"); wait_udp 5090
	read -r ok failed wall cpu < <(run_sipp "calls-$server" 127.0.0.1:5070 "${uac_sc[@]}" -s "$UAS_USER" \
		-d "$HOLD_MS" -r "$CPS" -m "$CALL_N" -p 5102 -timeout 300s)
	echo "RESULT server=$server phase=calls offered=$CALL_N cps=$CPS successful=$ok failed=$failed wall_s=$wall server_cpu_s=$cpu achieved_per_s=$(python3 -c "print(round($ok/$wall))") cpu_us_per_op=$(python3 -c "print(round($cpu*1e6/max($ok,1)))")"
	COST[$server-calls]=$(python3 -c "print($cpu/max($ok,1))")
	kill "$UAS" "$SRV_PID" 2>/dev/null || true
	wait "$UAS" "$SRV_PID" 2>/dev/null || true
	sleep 1
done
for phase in reg calls; do
	echo "RATIO phase=$phase cpu_per_op sipzone-node/kamailio = $(python3 -c "print(round(${COST[sipzone-node-$phase]}/max(${COST[kamailio-$phase]},1e-9), 2))")"
done
