#!/bin/sh
# The qrm node agent: /init of every qrm boot image (POSIX sh for busybox ash).
#
# It speaks the node-agent protocol of docs/agent-protocol.md:
#   1. mount proc/sys/devtmpfs, load the drivers of the hardware present
#      (coldplug: /sys modaliases matched against /etc/qrm/modules.alias,
#      dependencies first from /etc/qrm/modules.load), find the NIC whose MAC
#      is qrm.mac, wait for its carrier, get an address with udhcpc;
#   2. POST /agent/v1/register with the enrollment token (qrm.enroll), keep
#      the per-resource token it answers;
#   3. POST /agent/v1/heartbeat every interval with state and load; obey the
#      command of the answer: none, reboot (reboot -f) or halt (poweroff -f);
#   4. qrm.mode=ve: fetch the VE's root filesystem archive (qrm.rootfs=URL)
#      into a tmpfs, put busybox and this agent into it, switch_root, and
#      continue there as PID 1: register with mode "ve", run the VE's
#      /etc/qrm/ve-start, report "active".
#
# Rules this script keeps:
#   * It never exits while it is PID 1 (the kernel panics when init exits):
#     every failure is logged to the console and retried.
#   * Nothing from the network is evaluated by the shell. Server answers are
#     parsed by a strict JSON parser (awk, below); an answer that is not a
#     well-formed object, or whose fields do not have the expected type and
#     alphabet, is logged and ignored.
#   * busybox wget -T crashes (busybox 1.35, Debian 12), so every request
#     runs under the timeout applet instead.
#
# Run as something other than PID 1 (the tests do), it skips mounting and
# module loading, and these variables replace what a real boot would use:
#   QRM_AGENT_CMDLINE   the kernel command line (default: /proc/cmdline)
#   QRM_AGENT_RUN       state directory (default: /run/qrm)
#   QRM_AGENT_REBOOT    command run for "reboot" (default: reboot -f)
#   QRM_AGENT_HALT      command run for "halt" (default: poweroff -f)
# udhcpc calls back into this script (agent.sh --dhcp-event EVENT).
# `agent.sh --json < FILE` prints the top-level members of a JSON object as
# "key<TAB>type<TAB>value" lines (for tests; refused as PID 1).

QRM_AGENT_VERSION=0.1.0
umask 022

if [ "$$" -eq 1 ] || [ "${QRM_AGENT_STAGE:-}" = ve ]; then
	PATH=/qrm/bin:/bin:/sbin:/usr/bin:/usr/sbin
	export PATH
fi

RUN=${QRM_AGENT_RUN:-/run/qrm}
REBOOT_CMD=${QRM_AGENT_REBOOT:-reboot -f}
HALT_CMD=${QRM_AGENT_HALT:-poweroff -f}
HTTP_TIMEOUT=15
MAX_ANSWER=65536
MODULES_DIR=
SERVER=
MAC=
GEN=0
ENROLL=
MODE=idle
VE=
ROOTFS=
ROOTFS_SIZE=
IFACE=
RESOURCE_ID=
TOKEN=
INTERVAL=10
STATE=idle
REASON=
ROOTFS_ERROR=
HTTP_STATUS=
HTTP_ERROR=

# ---------------------------------------------------------------------------
# Logging and validation
# ---------------------------------------------------------------------------

log() {
	up=
	if [ -r /proc/uptime ]; then read -r up _ </proc/uptime; fi
	printf 'qrm-agent[%s]: %s\n' "${up:-?}" "$*" >&2
}

is_uint() {
	case $1 in '' | *[!0-9]*) return 1 ;; esac
	[ ${#1} -le 12 ]
}

# A non-negative decimal number (JSON subset the agent accepts for intervals and loads).
is_decimal() {
	case $1 in '' | .* | *. | *.*.* | *[!0-9.]*) return 1 ;; esac
	[ ${#1} -le 20 ]
}

is_token() {
	case $1 in '' | *[!A-Za-z0-9._~+/=-]*) return 1 ;; esac
	[ ${#1} -le 512 ]
}

is_mac() {
	case $1 in
	[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]) return 0 ;;
	esac
	return 1
}

is_url() {
	case $1 in http://?* | https://?*) ;; *) return 1 ;; esac
	# No whitespace, quotes, backslashes or shell metacharacters.
	case $1 in *[[:space:]\"\'\\\`\$\<\>\|\{\}\(\)\*]*) return 1 ;; esac
	return 0
}

is_ipv4() {
	case $1 in '' | *[!0-9.]* | .* | *. | *..*) return 1 ;; esac
	old_ifs=$IFS
	IFS=.
	# shellcheck disable=SC2086
	set -- $1
	IFS=$old_ifs
	[ $# -eq 4 ] || return 1
	for octet; do
		is_uint "$octet" && [ "$octet" -le 255 ] || return 1
	done
	return 0
}

is_hostname() {
	case $1 in '' | -* | *- | *[!A-Za-z0-9-]*) return 1 ;; esac
	[ ${#1} -le 63 ]
}

# ---------------------------------------------------------------------------
# JSON: a strict parser for the server's answers
# ---------------------------------------------------------------------------

# Reads one JSON text; if it is an object, prints "key<TAB>type<TAB>value"
# per top-level member (type: string, number, bool, null, object, array) and
# exits 0; anything malformed (or a duplicate top-level key, or nesting
# deeper than 20) exits 1 and prints nothing. Escaped control characters and
# \u escapes decode to "?", so values never contain tabs or newlines.
JSON_AWK='
function ws(   c) {
	while (pos <= n) {
		c = substr(text, pos, 1)
		if (c == " " || c == "\t" || c == "\n" || c == "\r") pos++
		else break
	}
}
function str(   s, c, h) {
	pos++
	s = ""
	while (pos <= n) {
		c = substr(text, pos, 1)
		if (c == "\"") { pos++; return s }
		if (c == "\\") {
			c = substr(text, pos + 1, 1)
			if (c == "\"" || c == "\\" || c == "/") s = s c
			else if (c == "b" || c == "f" || c == "n" || c == "r" || c == "t") s = s "?"
			else if (c == "u") {
				h = substr(text, pos + 2, 4)
				if (h !~ /^[0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f]$/) { bad = 1; return "" }
				s = s "?"
				pos += 4
			} else { bad = 1; return "" }
			pos += 2
			continue
		}
		if (c < " ") { bad = 1; return "" }
		s = s c
		pos++
	}
	bad = 1
	return ""
}
function value(depth,   c, rest) {
	if (depth > 20) { bad = 1; return }
	ws()
	c = substr(text, pos, 1)
	if (c == "{") { object(depth + 1, 0); vt = "object"; vv = ""; return }
	if (c == "[") { array(depth + 1); vt = "array"; vv = ""; return }
	if (c == "\"") { vv = str(); vt = "string"; return }
	if (substr(text, pos, 4) == "true") { pos += 4; vt = "bool"; vv = "true"; return }
	if (substr(text, pos, 5) == "false") { pos += 5; vt = "bool"; vv = "false"; return }
	if (substr(text, pos, 4) == "null") { pos += 4; vt = "null"; vv = ""; return }
	rest = substr(text, pos, 64)
	if (match(rest, /^-?(0|[1-9][0-9]*)([.][0-9]+)?([eE][-+]?[0-9]+)?/)) {
		vv = substr(rest, 1, RLENGTH)
		pos += RLENGTH
		vt = "number"
		return
	}
	bad = 1
}
function array(depth,   c) {
	pos++
	ws()
	if (substr(text, pos, 1) == "]") { pos++; return }
	while (!bad) {
		value(depth)
		if (bad) return
		ws()
		c = substr(text, pos, 1)
		if (c == ",") { pos++; continue }
		if (c == "]") { pos++; return }
		bad = 1
	}
}
function object(depth, top,   key, c) {
	pos++
	ws()
	if (substr(text, pos, 1) == "}") { pos++; return }
	while (!bad) {
		ws()
		if (substr(text, pos, 1) != "\"") { bad = 1; return }
		key = str()
		if (bad) return
		ws()
		if (substr(text, pos, 1) != ":") { bad = 1; return }
		pos++
		value(depth)
		if (bad) return
		if (top) {
			if (key in seen) { bad = 1; return }
			seen[key] = 1
			out[++count] = key "\t" vt "\t" vv
		}
		ws()
		c = substr(text, pos, 1)
		if (c == ",") { pos++; continue }
		if (c == "}") { pos++; return }
		bad = 1
	}
}
{ text = text $0 "\n" }
END {
	n = length(text)
	pos = 1
	bad = 0
	count = 0
	ws()
	if (substr(text, pos, 1) != "{") exit 1
	object(1, 1)
	if (bad) exit 1
	ws()
	if (pos <= n) exit 1
	for (i = 1; i <= count; i++) print out[i]
	exit 0
}'

# json_parse FILE: members of the JSON object in FILE into FILE.kv; status 1 if malformed.
json_parse() {
	size=$(wc -c <"$1" 2>/dev/null) || return 1
	[ "$size" -le "$MAX_ANSWER" ] || return 1
	awk "$JSON_AWK" "$1" >"$1.kv" || {
		rm -f "$1.kv"
		return 1
	}
}

# kv FILE TYPE KEY: print the value of top-level member KEY if it has TYPE.
kv() {
	awk -F '	' -v key="$3" -v type="$2" \
		'$1 == key && $2 == type { print $3; found = 1 } END { exit !found }' "$1.kv"
}

# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------

# http_post URL BEARER BODY: the answer goes to $RUN/answer, the status to
# HTTP_STATUS. Status 1 when no HTTP answer came at all (HTTP_ERROR says why).
http_post() {
	rm -f "$RUN/answer" "$RUN/answer.kv" "$RUN/headers"
	HTTP_STATUS=
	HTTP_ERROR=
	timeout "$HTTP_TIMEOUT" wget -q -S -O "$RUN/answer" \
		--header "Content-Type: application/json" \
		--header "Authorization: Bearer $2" \
		--post-data "$3" "$1" 2>"$RUN/headers"
	rc=$?
	HTTP_STATUS=$(sed -n 's/^ *HTTP\/[0-9.]* \([0-9][0-9][0-9]\).*/\1/p' "$RUN/headers" | tail -n 1)
	if [ -z "$HTTP_STATUS" ]; then
		HTTP_ERROR=$(grep -v '^ ' "$RUN/headers" | tail -n 1)
		[ -n "$HTTP_ERROR" ] || HTTP_ERROR="no answer within ${HTTP_TIMEOUT} s (exit status $rc)"
		return 1
	fi
	[ -f "$RUN/answer" ] || : >"$RUN/answer"
	return 0
}

# ---------------------------------------------------------------------------
# Facts about this machine
# ---------------------------------------------------------------------------

count_cpus() {
	n=$(grep -c '^processor' /proc/cpuinfo 2>/dev/null)
	is_uint "$n" && [ "$n" -gt 0 ] || n=1
	echo "$n"
}

# Installed memory in MB: the online memory blocks (what the machine has), or
# MemTotal (what the kernel can use) where the kernel shows no blocks.
memory_mb() {
	mb=
	if [ -r /sys/devices/system/memory/block_size_bytes ]; then
		read -r hex </sys/devices/system/memory/block_size_bytes
		blocks=0
		for state in /sys/devices/system/memory/memory*/state; do
			[ -r "$state" ] || continue
			read -r s <"$state"
			[ "$s" = online ] && blocks=$((blocks + 1))
		done
		case $hex in *[!0-9a-fA-F]* | '') ;; *)
			[ "$blocks" -gt 0 ] && mb=$((0x$hex / 1048576 * blocks))
			;;
		esac
	fi
	if [ -z "$mb" ] || [ "$mb" -le 0 ]; then
		kb=$(awk '$1 == "MemTotal:" { print $2 }' /proc/meminfo 2>/dev/null)
		is_uint "$kb" && mb=$((kb / 1024))
	fi
	is_uint "$mb" || mb=0
	echo "$mb"
}

read_load() {
	load=
	if [ -r /proc/loadavg ]; then read -r load _ </proc/loadavg; fi
	is_decimal "$load" || load=0
	echo "$load"
}

current_ip() {
	ip=$(cat "$RUN/ip" 2>/dev/null)
	is_ipv4 "$ip" || ip=
	echo "$ip"
}

# ---------------------------------------------------------------------------
# The kernel command line
# ---------------------------------------------------------------------------

read_cmdline() {
	if [ -n "${QRM_AGENT_CMDLINE+set}" ]; then
		cmdline=$QRM_AGENT_CMDLINE
	else
		cmdline=$(cat /proc/cmdline 2>/dev/null)
	fi
	set -f
	for arg in $cmdline; do
		case $arg in
		qrm.server=*) SERVER=${arg#*=} ;;
		qrm.mac=*) MAC=$(echo "${arg#*=}" | tr 'A-F-' 'a-f:') ;;
		qrm.gen=*) GEN=${arg#*=} ;;
		qrm.enroll=*) ENROLL=${arg#*=} ;;
		qrm.mode=*) MODE=${arg#*=} ;;
		qrm.ve=*) VE=${arg#*=} ;;
		qrm.rootfs=*) ROOTFS=${arg#*=} ;;
		qrm.rootfs_size=*) ROOTFS_SIZE=${arg#*=} ;;
		esac
	done
	set +f
	if ! is_url "$SERVER"; then
		log "qrm.server=${SERVER:-(missing)} is not an http:// URL; nothing to talk to"
		SERVER=
	fi
	SERVER=${SERVER%/}
	if [ -n "$MAC" ] && ! is_mac "$MAC"; then
		log "ignoring invalid qrm.mac=$MAC"
		MAC=
	fi
	is_uint "$GEN" || {
		log "invalid qrm.gen=$GEN; using 0"
		GEN=0
	}
	if [ -n "$ENROLL" ] && ! is_token "$ENROLL"; then
		log "invalid qrm.enroll token; registration will be refused"
		ENROLL=
	fi
	case $MODE in idle | ve) ;; *)
		log "unknown qrm.mode=$MODE; booting idle"
		MODE=idle
		;;
	esac
	if [ -n "$ROOTFS" ] && ! is_url "$ROOTFS"; then
		log "invalid qrm.rootfs=$ROOTFS"
		ROOTFS=
	fi
	if [ -n "$ROOTFS_SIZE" ] && ! is_uint "$ROOTFS_SIZE"; then
		log "invalid qrm.rootfs_size=$ROOTFS_SIZE (megabytes); using the default"
		ROOTFS_SIZE=
	fi
	case $VE in *[!A-Za-z0-9._-]*) VE=invalid ;; esac
}

# ---------------------------------------------------------------------------
# Early boot: filesystems and drivers
# ---------------------------------------------------------------------------

mount_basics() {
	mkdir -p /proc /sys /dev /run /tmp
	grep -q ' /proc ' /proc/mounts 2>/dev/null || mount -t proc proc /proc
	grep -q ' /sys ' /proc/mounts || mount -t sysfs sysfs /sys
	grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
	mkdir -p /dev/pts
	grep -q ' /dev/pts ' /proc/mounts || mount -t devpts devpts /dev/pts 2>/dev/null
}

module_setup() {
	kver=$(sed -n 's/^kernel=//p' /etc/qrm/release 2>/dev/null)
	MODULES_DIR=/lib/modules/$kver
	running=$(uname -r)
	if [ -n "$kver" ] && [ "$kver" != "$running" ]; then
		log "this initrd carries modules of kernel $kver but kernel $running runs: drivers will not load"
	fi
	# Let the kernel's own module requests (crypto, PHY drivers) use busybox modprobe.
	[ -w /proc/sys/kernel/modprobe ] && echo /sbin/modprobe >/proc/sys/kernel/modprobe
}

is_loaded() {
	[ -d "/sys/module/$(echo "$1" | tr - _)" ]
}

# load_module NAME: insmod NAME and what it needs, in the order the boot image recorded.
load_module() {
	line=$(grep -m 1 "^$1 " /etc/qrm/modules.load 2>/dev/null)
	if [ -z "$line" ]; then
		log "the boot image has no module $1"
		return 1
	fi
	set -f
	# shellcheck disable=SC2086
	set -- $line
	set +f
	shift
	for path; do
		name=${path##*/}
		name=${name%.ko}
		is_loaded "$name" && continue
		if out=$(insmod "$MODULES_DIR/$path" 2>&1); then
			log "loaded module $name"
		else
			log "insmod $name failed: $out"
		fi
	done
}

# coldplug: load the drivers whose aliases match present devices; repeat while
# new devices appear (virtio devices only show up once virtio_pci is loaded).
coldplug() {
	[ -r /etc/qrm/modules.alias ] || return 0
	round=0
	while [ $round -lt 4 ]; do
		round=$((round + 1))
		cat /sys/bus/*/devices/*/modalias >"$RUN/modaliases" 2>/dev/null
		# Patterns with a literal prefix of KEY characters (PCI vendor and
		# device) are looked up by that prefix; only the others are tried on
		# every device. Under TCG this keeps a pass well below a second.
		awk -v KEY=22 '
			NR == FNR {
				mod[NR] = $1; re[NR] = $2; pre = (NF >= 3 ? $3 : "")
				if (length(pre) >= KEY) idx[substr(pre, 1, KEY)] = idx[substr(pre, 1, KEY)] " " NR
				else generic = generic " " NR
				next
			}
			{
				list = generic idx[substr($0, 1, KEY)]
				n = split(list, cand, " ")
				for (i = 1; i <= n; i++) if ($0 ~ re[cand[i]]) print mod[cand[i]]
			}' /etc/qrm/modules.alias "$RUN/modaliases" | sort -u >"$RUN/wanted"
		new=0
		while read -r mod; do
			is_loaded "$mod" && continue
			load_module "$mod" && new=1
		done <"$RUN/wanted"
		[ $new -eq 1 ] || break
	done
}

load_all_nic_modules() {
	log "no NIC matched a driver by alias; loading every NIC driver of the boot image"
	while read -r mod; do
		[ -n "$mod" ] && ! is_loaded "$mod" && load_module "$mod"
	done </etc/qrm/modules.nic
}

# ---------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------

find_iface() {
	IFACE=
	for dir in /sys/class/net/*; do
		[ -r "$dir/address" ] || continue
		name=${dir##*/}
		[ "$name" = lo ] && continue
		read -r addr <"$dir/address"
		if [ -n "$MAC" ]; then
			[ "$addr" = "$MAC" ] && IFACE=$name && return 0
		else
			type=
			read -r type <"$dir/type" 2>/dev/null
			[ "$type" = 1 ] && IFACE=$name && MAC=$addr && return 0
		fi
	done
	return 1
}

wait_for_iface() {
	tries=0
	while [ $tries -lt "$1" ]; do
		find_iface && return 0
		tries=$((tries + 1))
		sleep 0.5
	done
	return 1
}

wait_for_carrier() {
	tries=0
	while [ $tries -lt 60 ]; do
		carrier=0
		read -r carrier <"/sys/class/net/$IFACE/carrier" 2>/dev/null
		[ "$carrier" = 1 ] && return 0
		tries=$((tries + 1))
		sleep 0.25
	done
	log "no carrier on $IFACE after 15 s; trying DHCP anyway"
}

bring_up_nic() {
	if [ "$$" -eq 1 ]; then
		coldplug
	fi
	fallback_done=0
	while ! wait_for_iface 10; do
		if [ "$$" -eq 1 ] && [ $fallback_done -eq 0 ]; then
			load_all_nic_modules
			fallback_done=1
			continue
		fi
		log "no network interface with MAC ${MAC:-(any)}: the boot image has no driver for it? retrying"
		sleep 10
		[ "$$" -eq 1 ] && coldplug
	done
	log "network interface $IFACE ($MAC)"
	ip link set dev "$IFACE" up
	wait_for_carrier
}

# udhcpc runs a program at DHCP events: a wrapper that calls this agent with
# the shell this stage has (a VE root need not have /bin/sh).
udhcpc_script() {
	self=$0
	case $self in /*) ;; *) self=$(pwd)/$self ;; esac
	shell=/bin/sh
	if [ "$STAGE" = ve ]; then
		shell=/qrm/bin/sh
	elif [ "$$" -ne 1 ]; then
		# (busybox ash's "command -v" names applets without a path)
		old_ifs=$IFS
		IFS=:
		for dir in $PATH; do
			[ -x "$dir/sh" ] && shell=$dir/sh && break
		done
		IFS=$old_ifs
	fi
	printf '#!%s\nexec %s %s --dhcp-event "$@"\n' "$shell" "$shell" "$self" >"$RUN/udhcpc.script"
	chmod 0755 "$RUN/udhcpc.script"
	echo "$RUN/udhcpc.script"
}

# Blocks until there is a lease; udhcpc then keeps renewing it in the background.
start_dhcp() {
	request=
	[ -n "$1" ] && request="-r $1"
	script=$(udhcpc_script)
	while :; do
		[ -f "$RUN/udhcpc.pid" ] && kill "$(cat "$RUN/udhcpc.pid")" 2>/dev/null
		rm -f "$RUN/ip"
		# shellcheck disable=SC2086
		udhcpc -i "$IFACE" -s "$script" -p "$RUN/udhcpc.pid" -t 6 -T 1 -A 2 $request
		[ -n "$(current_ip)" ] && return 0
		log "no DHCP lease on $IFACE; retrying"
		sleep 2
	done
}

mask_to_prefix() {
	prefix=0
	old_ifs=$IFS
	IFS=.
	# shellcheck disable=SC2086
	set -- $1
	IFS=$old_ifs
	for octet; do
		case $octet in
		255) prefix=$((prefix + 8)) ;;
		254) prefix=$((prefix + 7)) ;;
		252) prefix=$((prefix + 6)) ;;
		248) prefix=$((prefix + 5)) ;;
		240) prefix=$((prefix + 4)) ;;
		224) prefix=$((prefix + 3)) ;;
		192) prefix=$((prefix + 2)) ;;
		128) prefix=$((prefix + 1)) ;;
		esac
	done
	echo "$prefix"
}

# Called by udhcpc (as $RUN/udhcpc.script EVENT) with the lease in the environment.
dhcp_event() {
	mkdir -p "$RUN"
	case $1 in
	deconfig)
		# Keep any address until a lease says otherwise (a VE keeps its address
		# across switch_root while udhcpc starts again).
		ip link set dev "$interface" up
		;;
	bound | renew)
		if ! is_ipv4 "${ip:-}"; then
			log "dhcp: ignoring a lease without a valid address"
			return 0
		fi
		prefix=${mask:-}
		is_uint "$prefix" || prefix=$(mask_to_prefix "${subnet:-255.255.255.0}")
		if ! ip -o -f inet addr show dev "$interface" | grep -q " $ip/$prefix "; then
			ip -f inet addr flush dev "$interface"
			ip addr add "$ip/$prefix" dev "$interface"
		fi
		if [ -n "${router:-}" ]; then
			# shellcheck disable=SC2086
			set -- $router
			is_ipv4 "$1" && ip route replace default via "$1" dev "$interface"
		fi
		if [ "${QRM_AGENT_STAGE:-}" != test ] && [ -n "${dns:-}" ]; then
			: >/etc/resolv.conf.qrm
			# shellcheck disable=SC2086
			for server in $dns; do
				is_ipv4 "$server" && echo "nameserver $server" >>/etc/resolv.conf.qrm
			done
			mv /etc/resolv.conf.qrm /etc/resolv.conf
		fi
		if is_hostname "${hostname:-}"; then
			echo "$hostname" >"$RUN/hostname"
			[ "${QRM_AGENT_STAGE:-}" != test ] && command -v hostname >/dev/null && hostname "$hostname"
		fi
		echo "$ip" >"$RUN/ip"
		log "dhcp: $interface has $ip/$prefix (router ${router:-none}, lease ${lease:-?} s)"
		;;
	leasefail | nak)
		log "dhcp: $1 on $interface ${message:-}"
		;;
	esac
	return 0
}

# ---------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------

register() {
	if [ -z "$SERVER" ]; then
		log "no qrm.server on the kernel command line; cannot register"
		return 1
	fi
	ip=$(current_ip)
	host=$(cat "$RUN/hostname" 2>/dev/null)
	if is_hostname "$host"; then host="\"$host\""; else host=null; fi
	if [ -n "$ip" ]; then ip="\"$ip\""; else ip=null; fi
	ve=null
	[ "$MODE" = ve ] && [ -n "$VE" ] && ve="\"$VE\""
	body=$(printf '{"mac": "%s", "ip": %s, "cpus": %s, "memory_mb": %s, "hostname": %s, "hypervisors": [], "boot_generation": %s, "mode": "%s", "ve": %s}' \
		"$MAC" "$ip" "$(count_cpus)" "$(memory_mb)" "$host" "$GEN" "$MODE" "$ve")
	if ! http_post "$SERVER/agent/v1/register" "$ENROLL" "$body"; then
		log "register: $SERVER is not reachable: $HTTP_ERROR"
		return 1
	fi
	case $HTTP_STATUS in
	200) ;;
	401)
		log "register: refused (401): the enrollment token (qrm.enroll) is wrong"
		return 1
		;;
	*)
		log "register: the server answered HTTP $HTTP_STATUS"
		return 1
		;;
	esac
	if ! json_parse "$RUN/answer"; then
		log "register: malformed answer from the server (not a JSON object); ignored"
		return 1
	fi
	rid=$(kv "$RUN/answer" number resource_id)
	tok=$(kv "$RUN/answer" string token)
	interval=$(kv "$RUN/answer" number heartbeat_interval) || interval=10
	if ! is_uint "$rid" || ! is_token "$tok" || ! is_decimal "$interval"; then
		log "register: malformed answer from the server (resource_id, token or heartbeat_interval); ignored"
		return 1
	fi
	RESOURCE_ID=$rid
	TOKEN=$tok
	set_interval "$interval"
	(
		umask 077
		echo "$TOKEN" >"$RUN/token"
	)
	log "registered as resource $RESOURCE_ID (mac $MAC, mode $MODE, heartbeat every $INTERVAL s)"
	return 0
}

set_interval() {
	whole=${1%%.*}
	is_uint "$whole" || whole=10
	if [ "$whole" -lt 1 ]; then
		INTERVAL=1
	elif [ "$whole" -gt 300 ]; then
		INTERVAL=300
	else
		INTERVAL=$1
	fi
}

# heartbeat: 0 ok, 1 failed (try again later), 2 token refused (register again).
heartbeat() {
	reason=
	if [ "$STATE" = failed ]; then
		# Only characters that need no escaping in JSON, at most 200 of them.
		reason=$(printf ', "reason": "%s"' "$(printf '%s' "$REASON" | tr -cd 'A-Za-z0-9 .,:;/()_=+-' | cut -c1-200)")
	fi
	body=$(printf '{"resource_id": %s, "state": "%s", "load": %s, "boot_generation": %s%s}' \
		"$RESOURCE_ID" "$STATE" "$(read_load)" "$GEN" "$reason")
	if ! http_post "$SERVER/agent/v1/heartbeat" "$TOKEN" "$body"; then
		log "heartbeat: $SERVER is not reachable: $HTTP_ERROR"
		return 1
	fi
	case $HTTP_STATUS in
	200) ;;
	401)
		log "heartbeat: the server no longer accepts this resource's token; registering again"
		TOKEN=
		return 2
		;;
	*)
		log "heartbeat: the server answered HTTP $HTTP_STATUS"
		return 1
		;;
	esac
	if ! json_parse "$RUN/answer"; then
		log "heartbeat: malformed answer from the server (not a JSON object); ignored"
		return 1
	fi
	command=$(kv "$RUN/answer" string command)
	case $command in
	none | reboot | halt) ;;
	*)
		log "heartbeat: malformed answer from the server (command '${command}'); ignored"
		return 1
		;;
	esac
	if interval=$(kv "$RUN/answer" number heartbeat_interval); then
		is_decimal "$interval" && set_interval "$interval"
	fi
	case $command in
	reboot) obey reboot ;;
	halt) obey halt ;;
	esac
	return 0
}

# report_failure REASON: tell the server this machine cannot do its job
# (state "failed"): its resource goes to error at once and a VE with failover
# moves on, instead of waiting for the boot timeout. Registers first if needed.
report_failure() {
	STATE=failed
	REASON=$1
	log "reporting failure to the server: $REASON"
	if [ -z "$TOKEN" ]; then
		register || return 1
	fi
	heartbeat
}

obey() {
	log "the server commands: $1"
	if [ "$STAGE" = ve ]; then run_ve_script /etc/qrm/ve-stop 60; fi
	sync
	if [ "$1" = reboot ]; then
		$REBOOT_CMD
	else
		$HALT_CMD
	fi
	log "$1 did not happen (exit status $?); still running"
}

agent_loop() {
	backoff=2
	while :; do
		if [ -z "$TOKEN" ]; then
			if register; then
				backoff=2
				[ "$STAGE" = ve ] && ve_started_once
			else
				sleep "$backoff"
				backoff=$((backoff * 2))
				[ $backoff -gt 30 ] && backoff=30
				continue
			fi
		fi
		heartbeat
		sleep "$INTERVAL"
	done
}

# ---------------------------------------------------------------------------
# Virtual environments whose root filesystem is an archive unpacked into RAM
# ---------------------------------------------------------------------------

fetch_rootfs() {
	mkdir -p /newroot
	grep -q ' /newroot ' /proc/mounts && umount /newroot
	opts=mode=0755
	[ -n "$ROOTFS_SIZE" ] && opts="$opts,size=${ROOTFS_SIZE}m"
	if ! mount -t tmpfs -o "$opts" qrm-root /newroot; then
		ROOTFS_ERROR="cannot mount a tmpfs for it"
		log "cannot mount a tmpfs for the VE root"
		return 1
	fi
	log "fetching the VE root filesystem from $ROOTFS"
	rm -f "$RUN/headers"
	if (
		set -o pipefail
		timeout 900 wget -q -S -O - "$ROOTFS" 2>"$RUN/headers" | tar -xzf - -C /newroot
	); then
		files=$(ls -A /newroot | wc -l)
		log "VE root filesystem unpacked ($files top-level entries)"
		return 0
	fi
	status=$(sed -n 's/^ *HTTP\/[0-9.]* \([0-9][0-9][0-9]\).*/\1/p' "$RUN/headers" | tail -n 1)
	case $status in
	2??) ROOTFS_ERROR="HTTP $status, but the archive could not be unpacked" ;;
	"") ROOTFS_ERROR="no answer" ;;
	*) ROOTFS_ERROR="HTTP $status" ;;
	esac
	log "could not fetch or unpack $ROOTFS ($ROOTFS_ERROR: $(grep -v '^ ' "$RUN/headers" | tail -n 1))"
	umount /newroot
	return 1
}

switch_to_ve() {
	mkdir -p /newroot/qrm/bin /newroot/proc /newroot/sys /newroot/dev /newroot/run /newroot/tmp /newroot/etc
	cp /bin/busybox /newroot/qrm/bin/busybox
	cp "$0" /newroot/qrm/agent.sh
	chmod 0755 /newroot/qrm/bin/busybox /newroot/qrm/agent.sh
	[ -f /etc/resolv.conf ] && [ ! -e /newroot/etc/resolv.conf ] && cp /etc/resolv.conf /newroot/etc/resolv.conf
	mkdir -p /newroot/run/qrm
	current_ip >/newroot/run/qrm/ip
	[ -f "$RUN/hostname" ] && cp "$RUN/hostname" /newroot/run/qrm/hostname
	[ -f "$RUN/udhcpc.pid" ] && kill "$(cat "$RUN/udhcpc.pid")" 2>/dev/null
	log "switching to the VE root filesystem ($VE)"
	umount /dev/pts 2>/dev/null
	for fs in proc sys dev; do
		mount -o move "/$fs" "/newroot/$fs" || echo "qrm-agent: cannot move /$fs into the VE root" >&2
	done
	exec switch_root /newroot /qrm/bin/busybox sh /qrm/agent.sh --stage=ve
}

# The shell a VE script runs with: its own interpreter if it has it, else busybox sh.
run_ve_script() {
	script=$1
	[ -f "$script" ] || return 0
	first=
	read -r first <"$script" 2>/dev/null
	interpreter=${first#\#!}
	interpreter=${interpreter%% *}
	log "running $script"
	if [ "${first#\#!}" != "$first" ] && [ -x "$interpreter" ] && [ -x "$script" ]; then
		PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/qrm/bin timeout "$2" "$script" </dev/null
	else
		PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/qrm/bin timeout "$2" /qrm/bin/busybox sh "$script" </dev/null
	fi
	rc=$?
	if [ $rc -eq 0 ]; then log "$script finished"; else log "$script failed (exit status $rc)"; fi
	return 0
}

VE_STARTED=0
ve_started_once() {
	[ $VE_STARTED -eq 1 ] && return 0
	VE_STARTED=1
	run_ve_script /etc/qrm/ve-start 300
	STATE=active
	log "virtual environment ${VE:-?} is active"
}

# ---------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------

stage_initrd() {
	STAGE=initrd
	if [ "$$" -eq 1 ]; then
		mount_basics
		QRM_AGENT_STAGE=initrd
	else
		QRM_AGENT_STAGE=test
	fi
	export QRM_AGENT_STAGE QRM_AGENT_RUN="$RUN"
	mkdir -p "$RUN"
	log "qrm node agent $QRM_AGENT_VERSION starting (kernel $(uname -r))"
	read_cmdline
	[ "$$" -eq 1 ] && module_setup
	bring_up_nic
	start_dhcp ""
	if [ "$MODE" = ve ]; then
		if [ "$$" -ne 1 ]; then
			log "qrm.mode=ve needs to run as /init (PID 1); staying idle"
			MODE=idle
		elif [ -z "$ROOTFS" ]; then
			log "qrm.mode=ve without qrm.rootfs: this boot image boots only VEs whose root is an archive in RAM"
		fi
		backoff=5
		while [ "$MODE" = ve ]; do
			if [ -n "$ROOTFS" ] && fetch_rootfs; then
				switch_to_ve
			fi
			if [ -n "$ROOTFS" ]; then
				report_failure "cannot fetch the root filesystem of virtual environment ${VE:-?} ($ROOTFS_ERROR)"
			else
				report_failure "this boot image boots only virtual environments whose root is an archive (no qrm.rootfs)"
			fi
			log "cannot boot virtual environment ${VE:-?}; retrying in $backoff s"
			sleep $backoff
			backoff=$((backoff * 2))
			[ $backoff -gt 60 ] && backoff=60
		done
	fi
	STATE=idle
	agent_loop
}

stage_ve() {
	STAGE=ve
	QRM_AGENT_STAGE=ve
	RUN=/run/qrm
	export QRM_AGENT_STAGE QRM_AGENT_RUN="$RUN"
	/qrm/bin/busybox --install -s /qrm/bin 2>/dev/null
	mkdir -p "$RUN" /dev/pts
	grep -q ' /dev/pts ' /proc/mounts || mount -t devpts devpts /dev/pts 2>/dev/null
	log "qrm node agent $QRM_AGENT_VERSION continuing in the VE root"
	read_cmdline
	MODE=ve
	STATE=idle
	if ! wait_for_iface 20; then
		log "the network interface $MAC vanished"
	fi
	start_dhcp "$(current_ip)"
	agent_loop
}

# Never return while PID 1; a stage that ends by mistake is restarted.
main() {
	if [ "${1:-}" = --dhcp-event ] && [ "$$" -ne 1 ]; then
		shift
		dhcp_event "$@"
		exit 0
	fi
	if [ "${1:-}" = --json ] && [ "$$" -ne 1 ]; then
		tmp=${TMPDIR:-/tmp}/qrm-json.$$
		cat >"$tmp"
		MAX_ANSWER=65536
		if json_parse "$tmp"; then cat "$tmp.kv"; rc=0; else rc=1; fi
		rm -f "$tmp" "$tmp.kv"
		exit $rc
	fi
	if [ "${1:-}" = --stage=ve ]; then
		stage_ve
	else
		stage_initrd
	fi
}

main "$@"
while [ "$$" -eq 1 ]; do
	log "the agent stopped unexpectedly; sleeping (the kernel panics if init exits)"
	sleep 60
done
exit 1
