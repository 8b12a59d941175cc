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
#   4. qrm.mode=ve: make the VE's root filesystem /newroot, put busybox and
#      this agent into it (a tmpfs on /qrm), switch_root, and continue there as
#      PID 1: register with mode "ve", run the VE's /etc/qrm/ve-start, report
#      "active". The root is one of (the storage driver's kernel arguments):
#        - an archive fetched into a tmpfs (qrm.rootfs=URL, qrm.rootfs_size=MB);
#        - NFS (root=/dev/nfs nfsroot=ADDR:PATH[,vers=3,tcp]): the client
#          modules are loaded and busybox mount hands the kernel its string
#          options (nolock, addr=ADDR);
#        - iSCSI (qrm.iscsi=ADDR:PORT:LUN:TARGET qrm.initiator=IQN
#          rootfstype=ext4): the initiator modules are loaded, the CHAP
#          credentials are fetched from the server over the agent's
#          authenticated channel (POST /agent/v1/root-secrets; never on the
#          kernel command line), iscsistart logs in, the LUN's disk is mounted;
#      read-write (rw) for a single machine, or read-only (ro) with
#      qrm.overlay=tmpfs: the image below an overlay whose writable layer is
#      in RAM (shared pools: the image stays pristine). A root that cannot be
#      made is reported as heartbeat state "failed" with the reason.
#   5. qrm.fill=local-disk[:/dev/DEVICE] qrm.fill_mb=MB (the one machine placed
#      into a VE whose auto image is to be filled from a local disk): before
#      the above, mount the network root read-write, the local partition
#      (DEVICE, or the first local one holding a root filesystem) read-only,
#      copy everything over with tar (owners, modes, links, devices), report
#      progress (heartbeat state "filling", fill_bytes/fill_total), then
#      fill_result "done" (and boot on as in 4, no reboot) or state "failed"
#      with fill_result "failed" and the reason (the server releases the
#      machine and orders a reboot).
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
# "key<TAB>type<TAB>value" lines (for tests; refused as PID 1), and
# `agent.sh --root-plan` what a VE boot with QRM_AGENT_CMDLINE would mount.

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
ROOT_ARG=
NFSROOT=
ISCSI=
INITIATOR=
FSTYPE=ext4
ROOT_MODE=rw
OVERLAY=
ROOT_KIND=
ROOT_ERROR=
FILL=
FILL_MB=
FILL_DEVICE=
FILL_ERROR=
FILL_RESULT=
FILL_FIELDS=
FILL_BYTES=0
FILL_TOTAL=0
SYS_BLOCK=${QRM_AGENT_SYS_BLOCK:-/sys/class/block}
IFACE=
RESOURCE_ID=
TOKEN=
HOLD=
ANSWER_GEN=
HELD_SAID=
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

# An absolute path of safe characters, no "." or ".." part (what a storage driver exports).
is_path() {
	case $1 in /*) ;; *) return 1 ;; esac
	case $1 in *[!A-Za-z0-9._/-]* | */../* | */.. | */./* | */. | *//*) return 1 ;; esac
	[ ${#1} -le 1024 ]
}

# An iSCSI qualified name (iqn.YYYY-MM.reversed.domain[:anything safe]).
is_iqn() {
	case $1 in iqn.[0-9][0-9][0-9][0-9]-[0-9][0-9].?*) ;; *) return 1 ;; esac
	case $1 in *[!A-Za-z0-9.:_-]*) return 1 ;; esac
	[ ${#1} -le 223 ]
}

# NFS mount options the agent passes on: word or word=value, lower case, digits, dots.
is_nfs_options() {
	case $1 in '') return 0 ;; *[!a-z0-9.=,_]* | ,* | *, | *,,*) return 1 ;; esac
	[ ${#1} -le 200 ]
}

# A device path under /dev of safe characters, no part that begins with a dot.
is_device() {
	case $1 in /dev/?*) ;; *) return 1 ;; esac
	case $1 in *[!A-Za-z0-9_.:+/-]* | */.* | *//* | */) return 1 ;; esac
	[ ${#1} -le 128 ]
}

# A root-filesystem secret from the server (CHAP user or password).
is_secret() {
	case $1 in '' | *[!A-Za-z0-9._~+/=@:-]*) return 1 ;; esac
	[ ${#1} -le 255 ]
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
	# $4: this machine's current per-resource token, proof that a registration
	# comes from the agent the server knows (docs/agent-protocol.md).
	if [ -n "$4" ]; then
		timeout "$HTTP_TIMEOUT" wget -q -S -O "$RUN/answer" \
			--header "Content-Type: application/json" \
			--header "Authorization: Bearer $2" \
			--header "X-Qrm-Agent-Token: $4" \
			--post-data "$3" "$1" 2>"$RUN/headers"
	else
		timeout "$HTTP_TIMEOUT" wget -q -S -O "$RUN/answer" \
			--header "Content-Type: application/json" \
			--header "Authorization: Bearer $2" \
			--post-data "$3" "$1" 2>"$RUN/headers"
	fi
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
		root=*) ROOT_ARG=${arg#*=} ;;
		nfsroot=*) NFSROOT=${arg#*=} ;;
		qrm.iscsi=*) ISCSI=${arg#*=} ;;
		qrm.initiator=*) INITIATOR=${arg#*=} ;;
		rootfstype=*) FSTYPE=${arg#*=} ;;
		qrm.overlay=*) OVERLAY=${arg#*=} ;;
		qrm.fill=*) FILL=${arg#*=} ;;
		qrm.fill_mb=*) FILL_MB=${arg#*=} ;;
		ro) ROOT_MODE=ro ;;
		rw) ROOT_MODE=rw ;;
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
	read_fill_args
	read_root_args
}

# What qrm.fill asks (filling the VE's image from a local disk); FILL_ERROR when malformed.
read_fill_args() {
	FILL_DEVICE=
	FILL_ERROR=
	case $FILL in
	'' | local-disk) ;;
	local-disk:*)
		FILL_DEVICE=${FILL#local-disk:}
		if ! is_device "$FILL_DEVICE"; then
			FILL_ERROR="invalid qrm.fill=$FILL (local-disk or local-disk:/dev/NAME expected)"
			FILL_DEVICE=
		fi
		;;
	*) FILL_ERROR="unknown qrm.fill=$FILL (local-disk or local-disk:/dev/NAME expected)" ;;
	esac
	if [ -n "$FILL_MB" ] && ! is_uint "$FILL_MB"; then
		FILL_ERROR="invalid qrm.fill_mb=$FILL_MB (megabytes expected)"
		FILL_MB=
	fi
	FILL_ERROR=$(printf '%s' "$FILL_ERROR" | tr -cd 'A-Za-z0-9 .,:;/()_=+-' | cut -c1-160)
}

# Which root the VE has, from the storage driver's arguments; ROOT_ERROR when
# they are malformed (the VE is then reported failed, never booted half-way).
read_root_args() {
	ROOT_KIND=
	ROOT_ERROR=
	case $OVERLAY in '' | tmpfs) ;; *)
		ROOT_ERROR="unknown qrm.overlay=$OVERLAY (only tmpfs)"
		OVERLAY=
		;;
	esac
	case $FSTYPE in ext4 | ext3 | ext2 | xfs | btrfs) ;; *)
		ROOT_ERROR="unsupported rootfstype=$FSTYPE"
		FSTYPE=ext4
		;;
	esac
	if [ -n "$ROOTFS" ]; then
		ROOT_KIND=archive
	elif [ "$ROOT_ARG" = /dev/nfs ] || { [ -n "$NFSROOT" ] && [ -z "$ISCSI" ]; }; then
		ROOT_KIND=nfs
		NFS_SERVER=${NFSROOT%%:*}
		rest=${NFSROOT#*:}
		NFS_PATH=${rest%%,*}
		NFS_OPTIONS=
		case $rest in *,*) NFS_OPTIONS=${rest#*,} ;; esac
		if [ -z "$NFSROOT" ] || [ "$rest" = "$NFSROOT" ] || ! is_ipv4 "$NFS_SERVER" ||
			! is_path "$NFS_PATH" || ! is_nfs_options "$NFS_OPTIONS"; then
			ROOT_ERROR="invalid nfsroot=$NFSROOT (ADDRESS:/PATH[,OPTIONS] expected)"
			ROOT_KIND=
		fi
	elif [ -n "$ISCSI" ]; then
		ROOT_KIND=iscsi
		old_ifs=$IFS
		IFS=:
		# shellcheck disable=SC2086
		set -f
		set -- $ISCSI
		set +f
		IFS=$old_ifs
		ISCSI_ADDR=${1:-}
		ISCSI_PORT=${2:-}
		ISCSI_LUN=${3:-}
		ISCSI_TARGET=${ISCSI#*:*:*:}
		if [ $# -lt 4 ] || ! is_ipv4 "$ISCSI_ADDR" || ! is_uint "$ISCSI_PORT" ||
			[ "$ISCSI_PORT" -lt 1 ] || [ "$ISCSI_PORT" -gt 65535 ] || ! is_uint "$ISCSI_LUN" ||
			[ "$ISCSI_LUN" -gt 16383 ] || ! is_iqn "$ISCSI_TARGET"; then
			ROOT_ERROR="invalid qrm.iscsi=$ISCSI (ADDRESS:PORT:LUN:TARGET-IQN expected)"
			ROOT_KIND=
		fi
		if [ -n "$INITIATOR" ] && ! is_iqn "$INITIATOR"; then
			ROOT_ERROR="invalid qrm.initiator=$INITIATOR (an iqn. name expected)"
			ROOT_KIND=
		fi
	fi
	if [ -n "$OVERLAY" ] && [ "$ROOT_KIND" != nfs ] && [ "$ROOT_KIND" != iscsi ]; then
		OVERLAY=
	fi
	[ -n "$OVERLAY" ] && ROOT_MODE=ro
	# Nothing above ever reaches a shell unquoted; errors are shown cut and filtered.
	ROOT_ERROR=$(printf '%s' "$ROOT_ERROR" | tr -cd 'A-Za-z0-9 .,:;/()_=+-' | cut -c1-160)
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

# The hypervisors this machine offers qrm, as a JSON array: a VE that runs a
# libvirt daemon (its socket is there) is a host for qrm's libvirt plugins -
# "xen" in a Xen dom0, "qemu" where QEMU is installed. Registered with the
# machine (its capabilities); registered again when it changes.
LIBVIRT_SOCKETS="/run/libvirt/libvirt-sock /run/libvirt/virtqemud-sock /run/libvirt/virtxend-sock"
XEN_CAPABILITIES=/proc/xen/capabilities
QEMU_BINARIES="/usr/bin/qemu-system-x86_64 /usr/bin/qemu-system-i386 /usr/bin/qemu-system-aarch64 /usr/libexec/qemu-kvm"
HYPERVISORS="[]"
detect_hypervisors() {
	found=
	daemon=0
	for socket in $LIBVIRT_SOCKETS; do
		[ -S "$socket" ] && daemon=1
	done
	if [ $daemon -eq 1 ]; then
		if [ -r "$XEN_CAPABILITIES" ] && grep -q control_d "$XEN_CAPABILITIES" 2>/dev/null; then
			found='"xen"'
		fi
		for binary in $QEMU_BINARIES; do
			if [ -x "$binary" ]; then
				found="${found:+$found, }\"qemu\""
				break
			fi
		done
	fi
	printf '[%s]' "$found"
}

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
	HYPERVISORS=$(detect_hypervisors)
	# stage: where this agent is (the initrd, before a VE's root is mounted, or the VE).
	stage=ve
	[ "$STAGE" = ve ] || stage=initrd
	body=$(printf '{"mac": "%s", "ip": %s, "cpus": %s, "memory_mb": %s, "hostname": %s, "hypervisors": %s, "boot_generation": %s, "mode": "%s", "ve": %s, "stage": "%s"}' \
		"$MAC" "$ip" "$(count_cpus)" "$(memory_mb)" "$host" "$HYPERVISORS" "$GEN" "$MODE" "$ve" "$stage")
	# The token this machine holds (or held before switch_root): registering
	# again while alive keeps the identity only with it.
	proof=$TOKEN
	[ -z "$proof" ] && [ -s "$RUN/token" ] && proof=$(cat "$RUN/token")
	is_token "$proof" || proof=
	if ! http_post "$SERVER/agent/v1/register" "$ENROLL" "$body" "$proof"; then
		log "register: $SERVER is not reachable: $HTTP_ERROR"
		return 1
	fi
	case $HTTP_STATUS in
	200) ;;
	401)
		log "register: refused (401): the enrollment token (qrm.enroll) is wrong"
		return 1
		;;
	409)
		log "register: refused (409): the server still hears this machine's agent; trying again later"
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
	# hold: the VE is being reset, its image not reverted yet (wait_for_revert);
	# printable characters only, it is only logged.
	HOLD=$(kv "$RUN/answer" string hold | tr -cd ' -~' | cut -c1-200) || HOLD=
	ANSWER_GEN=$(kv "$RUN/answer" number boot_generation) || ANSWER_GEN=
	(
		umask 077
		echo "$TOKEN" >"$RUN/token"
	)
	if [ "$MODE" = ve ] && [ "$STAGE" != ve ]; then
		# wait_for_revert's registration: one line per boot, not one per second of a hold.
		[ -n "$HELD_SAID" ] || log "registered from the initrd as resource $RESOURCE_ID (mac $MAC), before mounting the root"
		HELD_SAID=1
	else
		log "registered as resource $RESOURCE_ID (mac $MAC, mode $MODE, heartbeat every $INTERVAL s)"
	fi
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
	body=$(printf '{"resource_id": %s, "state": "%s", "load": %s, "boot_generation": %s%s%s}' \
		"$RESOURCE_ID" "$STATE" "$(read_load)" "$GEN" "$reason" "$FILL_FIELDS")
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
		# A VE that started a libvirt daemon (ve-start) is a hypervisor host now: tell the server.
		if [ "$STAGE" = ve ] && [ "$(detect_hypervisors)" != "$HYPERVISORS" ]; then
			log "hypervisors offered: $(detect_hypervisors); registering again"
			register || TOKEN=
		fi
		[ "$STAGE" = ve ] && [ $VE_STARTED -eq 1 ] && check_root
		heartbeat
		sleep "$INTERVAL"
	done
}

# wait_for_revert: before a VE boot mounts its root, register from the initrd
# (the server learns that this machine's old OS is down) and wait while the
# server answers "hold": its VE is being reset and the image reverted
# (docs/agent-protocol.md). Reboots when the server has ordered another boot
# meanwhile (the reset failed and the VE stopped). A server that cannot be
# reached after a few tries, or that answers no hold (an older server), lets
# the boot go on as before.
wait_for_revert() {
	tries=0
	said=
	while :; do
		if ! register; then
			tries=$((tries + 1))
			[ $tries -ge 5 ] && return 0
			sleep 1
			continue
		fi
		tries=0
		if is_uint "$ANSWER_GEN" && [ "$ANSWER_GEN" != "$GEN" ]; then
			log "the server ordered boot $ANSWER_GEN meanwhile (this is boot $GEN); rebooting"
			obey reboot
		fi
		[ -z "$HOLD" ] && break
		[ "$HOLD" != "$said" ] && log "holding the boot: $HOLD"
		said=$HOLD
		sleep 1
	done
	[ -n "$said" ] && log "the server lets the boot go on"
	return 0
}

# A VE on a network root whose storage went away must not claim to run: before
# each heartbeat, ask the root's server something the client cannot answer from
# its caches (NFS: statfs; iSCSI: one block read past the page cache). No
# answer within 15 s: heartbeat state "failed" with the reason; an answer
# again: "active". The agent itself runs from RAM, so it can always say so.
check_root() {
	case $ROOT_KIND in
	nfs)
		where=/
		[ -n "$OVERLAY" ] && where=/run/qrm/lower
		probe() { timeout -s KILL 15 stat -f "$where" >/dev/null 2>&1; }
		what="nfs $NFS_SERVER:$NFS_PATH"
		;;
	iscsi)
		probe() {
			disk=$(iscsi_disk) || return 1
			timeout -s KILL 15 dd if="/dev/$disk" of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null
		}
		what="iscsi $ISCSI_TARGET on $ISCSI_ADDR:$ISCSI_PORT"
		;;
	*) return 0 ;;
	esac
	if probe; then
		if [ "$STATE" = failed ]; then
			log "the root filesystem ($what) answers again"
			STATE=active
			REASON=
		fi
	elif [ "$STATE" != failed ]; then
		STATE=failed
		REASON="the root filesystem ($what) does not answer"
		log "$REASON; reporting failure"
	fi
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

# ---------------------------------------------------------------------------
# Virtual environments whose root filesystem is on the network (NFS, iSCSI)
# ---------------------------------------------------------------------------

# Undo what an earlier attempt left mounted (a retry starts from scratch).
release_root() {
	for point in /newroot /qrm-rw /qrm-lower; do
		grep -q " $point " /proc/mounts 2>/dev/null && umount "$point" 2>/dev/null
	done
	mkdir -p /newroot /qrm-rw /qrm-lower
}

# The first line of a failed command's output, in characters a reason may hold.
first_error() {
	grep -v '^ *$' "$1" 2>/dev/null | tail -n 1 | tr -cd 'A-Za-z0-9 .,:;/()_=+-' | cut -c1-120
}

# mount_image FSTYPE DEVICE OPTIONS: mount a root image where it belongs
# (/newroot, or /qrm-lower below an overlay), then the overlay.
mount_image() {
	point=/newroot
	[ -n "$OVERLAY" ] && point=/qrm-lower
	if ! timeout -s KILL 90 mount -t "$1" -o "$3" "$2" "$point" >"$RUN/mount.err" 2>&1; then
		why=$(first_error "$RUN/mount.err")
		ROOT_ERROR="${why:-mount timed out}"
		return 1
	fi
	[ -n "$OVERLAY" ] || return 0
	load_module overlay
	opts=mode=0755
	[ -n "$ROOTFS_SIZE" ] && opts="$opts,size=${ROOTFS_SIZE}m"
	if ! mount -t tmpfs -o "$opts" qrm-overlay /qrm-rw; then
		ROOT_ERROR="cannot mount a tmpfs for the writable layer"
		return 1
	fi
	mkdir -p /qrm-rw/upper /qrm-rw/work
	if ! mount -t overlay -o lowerdir=/qrm-lower,upperdir=/qrm-rw/upper,workdir=/qrm-rw/work qrm-root /newroot \
		>"$RUN/mount.err" 2>&1; then
		ROOT_ERROR="cannot mount the overlay: $(first_error "$RUN/mount.err")"
		return 1
	fi
	log "the image is read-only below a writable layer in RAM (overlay)"
	return 0
}

mount_nfs_root() {
	release_root
	options=$ROOT_MODE,nolock,addr=$NFS_SERVER
	version=3
	old_ifs=$IFS
	IFS=,
	set -f
	for option in $NFS_OPTIONS; do
		case $option in
		tcp | udp) options="$options,proto=$option" ;;
		vers=* | nfsvers=*)
			version=${option#*=}
			options="$options,vers=$version"
			;;
		nolock | rw | ro | addr=*) ;;
		*) options="$options,$option" ;;
		esac
	done
	set +f
	IFS=$old_ifs
	case $version in 4*) load_module nfsv4 ;; *) load_module nfsv3 ;; esac
	log "mounting the VE root filesystem $NFS_SERVER:$NFS_PATH over NFS ($options)"
	if ! mount_image nfs "$NFS_SERVER:$NFS_PATH" "$options"; then
		ROOT_ERROR="nfs $NFS_SERVER:$NFS_PATH: $ROOT_ERROR"
		return 1
	fi
	return 0
}

# fetch_root_secrets: the root's credentials (CHAP) from the server, over the
# agent's own authenticated channel; ROOT_USER and ROOT_PASSWORD, or empty.
fetch_root_secrets() {
	ROOT_USER=
	ROOT_PASSWORD=
	if [ -z "$TOKEN" ]; then
		register || {
			ROOT_ERROR="cannot register with the server to fetch the credentials of the root"
			return 1
		}
	fi
	body=$(printf '{"resource_id": %s, "boot_generation": %s}' "$RESOURCE_ID" "$GEN")
	if ! http_post "$SERVER/agent/v1/root-secrets" "$TOKEN" "$body"; then
		ROOT_ERROR="cannot fetch the credentials of the root: $HTTP_ERROR"
		return 1
	fi
	if [ "$HTTP_STATUS" != 200 ] || ! json_parse "$RUN/answer"; then
		rm -f "$RUN/answer" "$RUN/answer.kv"
		[ "$HTTP_STATUS" = 401 ] && TOKEN=
		ROOT_ERROR="the server refused the credentials of the root (HTTP $HTTP_STATUS)"
		return 1
	fi
	user=$(kv "$RUN/answer" string chap_username)
	password=$(kv "$RUN/answer" string chap_password)
	rm -f "$RUN/answer" "$RUN/answer.kv"
	if [ -n "$user$password" ] && { ! is_secret "$user" || ! is_secret "$password"; }; then
		ROOT_ERROR="malformed credentials for the root from the server"
		return 1
	fi
	ROOT_USER=$user
	ROOT_PASSWORD=$password
	return 0
}

# The block device of LUN $ISCSI_LUN in the session with $ISCSI_TARGET.
iscsi_disk() {
	for session in /sys/class/iscsi_session/session*; do
		[ -r "$session/targetname" ] || continue
		read -r name <"$session/targetname"
		[ "$name" = "$ISCSI_TARGET" ] || continue
		for block in "$session"/device/target*/*:*:*:"$ISCSI_LUN"/block/*; do
			[ -e "$block" ] && echo "${block##*/}" && return 0
		done
	done
	return 1
}

mount_iscsi_root() {
	release_root
	if [ ! -x /usr/sbin/iscsistart ]; then
		ROOT_ERROR="this boot image has no iSCSI initiator (build it on a host with open-iscsi installed)"
		return 1
	fi
	initiator=$INITIATOR
	[ -n "$initiator" ] || initiator="iqn.2026-12.org.qrm:$(echo "$MAC" | tr -d :)"
	for module in iscsi_tcp sd_mod "$FSTYPE"; do
		is_loaded "$module" || load_module "$module"
	done
	fetch_root_secrets || return 1
	where="iscsi $ISCSI_TARGET on $ISCSI_ADDR:$ISCSI_PORT"
	if ! iscsi_disk >/dev/null; then
		log "logging in to $ISCSI_TARGET at $ISCSI_ADDR:$ISCSI_PORT as $initiator${ROOT_USER:+ (CHAP user $ROOT_USER)}"
		set -- -i "$initiator" -t "$ISCSI_TARGET" -g 1 -a "$ISCSI_ADDR" -p "$ISCSI_PORT"
		[ -n "$ROOT_USER" ] && set -- "$@" -u "$ROOT_USER" -w "$ROOT_PASSWORD"
		timeout -s KILL 90 iscsistart "$@" >"$RUN/iscsi.log" 2>&1
		rc=$?
		ROOT_PASSWORD=
		set --
		if [ $rc -ne 0 ]; then
			why=$(grep -i -e error -e fail -e "not found" "$RUN/iscsi.log" | tail -n 1 |
				sed 's/^iscsistart: *//' | tr -cd 'A-Za-z0-9 .,:;/()_=+-' | cut -c1-120)
			ROOT_ERROR="$where: login failed: ${why:-exit status $rc}"
			return 1
		fi
	fi
	ROOT_PASSWORD=
	tries=0
	while ! disk=$(iscsi_disk); do
		tries=$((tries + 1))
		if [ $tries -gt 40 ]; then
			ROOT_ERROR="$where: the target has no LUN $ISCSI_LUN"
			return 1
		fi
		sleep 0.25
	done
	log "iSCSI LUN $ISCSI_LUN of $ISCSI_TARGET is /dev/$disk; mounting it ($FSTYPE, $ROOT_MODE)"
	if ! mount_image "$FSTYPE" "/dev/$disk" "$ROOT_MODE"; then
		ROOT_ERROR="$where: LUN $ISCSI_LUN (/dev/$disk): $ROOT_ERROR"
		return 1
	fi
	return 0
}

# ---------------------------------------------------------------------------
# Filling the VE's image from this machine's local disk (qrm.fill=local-disk)
# ---------------------------------------------------------------------------

# The local block devices that may hold a root filesystem, in name order:
# partitions, and whole disks without partitions; none that is mounted (the
# network root's iSCSI LUN is, while this runs).
local_devices() {
	for entry in "$SYS_BLOCK"/*; do
		[ -e "$entry" ] || continue
		name=${entry##*/}
		case $name in loop* | ram* | zram* | sr* | fd* | nbd*) continue ;; esac
		is_device "/dev/$name" || continue
		size=$(cat "$entry/size" 2>/dev/null)
		is_uint "$size" && [ "$size" -gt 0 ] || continue
		if [ ! -e "$entry/partition" ]; then
			parts=0
			for part in "$entry/$name"*; do
				[ -e "$part/partition" ] && parts=1 && break
			done
			[ $parts -eq 1 ] && continue
		fi
		grep -q "^/dev/$name " /proc/mounts 2>/dev/null && continue
		echo "/dev/$name"
	done
}

# mount_local DEVICE: DEVICE read-only on /qrm-local: 0, 1 cannot mount, 2 no root there.
mount_local() {
	mkdir -p /qrm-local
	grep -q ' /qrm-local ' /proc/mounts 2>/dev/null && umount /qrm-local
	for fs in ext4 xfs btrfs; do
		is_loaded "$fs" || { grep -q "^$fs " /etc/qrm/modules.load 2>/dev/null && load_module "$fs"; }
	done
	if ! timeout -s KILL 60 mount -o ro "$1" /qrm-local >"$RUN/local.err" 2>&1; then
		return 1
	fi
	if [ -d /qrm-local/etc ] && { [ -d /qrm-local/bin ] || [ -d /qrm-local/usr/bin ] || [ -e /qrm-local/sbin/init ]; }; then
		return 0
	fi
	umount /qrm-local
	return 2
}

# fill_find_local: the local root filesystem on /qrm-local (FILL_DEVICE), or FILL_ERROR.
fill_find_local() {
	if [ -n "$FILL_DEVICE" ]; then
		if [ ! -b "$FILL_DEVICE" ]; then
			FILL_ERROR="this machine has no local disk $FILL_DEVICE"
			return 1
		fi
		mount_local "$FILL_DEVICE"
		case $? in
		0) return 0 ;;
		1) FILL_ERROR="cannot mount $FILL_DEVICE: $(first_error "$RUN/local.err")" ;;
		*) FILL_ERROR="$FILL_DEVICE holds no root filesystem (no /etc and /bin)" ;;
		esac
		return 1
	fi
	tried=
	for dev in $(local_devices); do
		tried="$tried $dev"
		if mount_local "$dev"; then
			FILL_DEVICE=$dev
			return 0
		fi
	done
	if [ -z "$tried" ]; then
		FILL_ERROR="this machine has no local disk"
	else
		FILL_ERROR="no local disk holds a mountable root filesystem (tried$tried)"
	fi
	return 1
}

# fill_heartbeat: a heartbeat that says how the filling goes.
fill_heartbeat() {
	FILL_FIELDS=$(printf ', "fill_bytes": %s, "fill_total": %s' "$FILL_BYTES" "$FILL_TOTAL")
	is_device "$FILL_DEVICE" && FILL_FIELDS="$FILL_FIELDS, \"fill_device\": \"$FILL_DEVICE\""
	[ -n "$FILL_RESULT" ] && FILL_FIELDS="$FILL_FIELDS, \"fill_result\": \"$FILL_RESULT\""
	heartbeat
	rc=$?
	FILL_FIELDS=
	return $rc
}

# fill_copy SOURCE TARGET: everything of SOURCE onto TARGET (emptied first: a machine
# that rebooted while filling starts again), heartbeats with the progress; FILL_ERROR.
fill_copy() {
	total_kb=$(du -sk "$1" 2>/dev/null | cut -f1)
	if ! is_uint "$total_kb"; then
		FILL_ERROR="cannot measure what $FILL_DEVICE holds"
		return 1
	fi
	FILL_TOTAL=$((total_kb * 1024))
	FILL_BYTES=0
	need_mb=$(((total_kb + 1023) / 1024))
	if is_uint "$FILL_MB" && [ "$FILL_MB" -gt 0 ] && [ "$need_mb" -gt "$FILL_MB" ]; then
		FILL_ERROR="the volume is too small: $FILL_DEVICE holds $need_mb MB, the image $FILL_MB MB"
		return 1
	fi
	free_kb=$(df -Pk "$2" 2>/dev/null | awk 'NR == 2 {print $4}')
	if is_uint "$free_kb" && [ "$total_kb" -gt "$free_kb" ]; then
		FILL_ERROR="the volume is too small: $FILL_DEVICE holds $need_mb MB, the volume has $((free_kb / 1024)) MB free"
		return 1
	fi
	for old in "$2"/* "$2"/.[!.]* "$2"/..?*; do
		[ -e "$old" ] || [ -L "$old" ] || continue
		[ "$old" = "$2/lost+found" ] && continue
		rm -rf "$old"
	done
	(
		set -o pipefail
		tar -C "$1" -cf - . | tar -C "$2" --numeric-owner -xf -
	) >"$RUN/fill.err" 2>&1 &
	copier=$!
	every=${INTERVAL%%.*}
	is_uint "$every" && [ "$every" -ge 1 ] || every=10
	while kill -0 "$copier" 2>/dev/null; do
		done_kb=$(du -sk "$2" 2>/dev/null | cut -f1)
		is_uint "$done_kb" && FILL_BYTES=$((done_kb * 1024))
		[ "$FILL_BYTES" -gt "$FILL_TOTAL" ] && FILL_BYTES=$FILL_TOTAL
		log "filling: $FILL_BYTES of $FILL_TOTAL bytes"
		fill_heartbeat
		waited=0
		while [ $waited -lt "$every" ] && kill -0 "$copier" 2>/dev/null; do
			sleep 1
			waited=$((waited + 1))
		done
	done
	wait "$copier"
	rc=$?
	sync
	if [ $rc -ne 0 ]; then
		why=$(first_error "$RUN/fill.err")
		FILL_ERROR="copying $FILL_DEVICE failed: ${why:-exit status $rc}"
		return 1
	fi
	FILL_BYTES=$FILL_TOTAL
	return 0
}

# fill_image: 0 filled and reported, 1 the network root cannot be mounted
# (ROOT_ERROR; tried again as any root), 2 the filling failed (FILL_ERROR).
fill_image() {
	[ -n "$FILL_ERROR" ] && return 2
	if [ "$ROOT_KIND" != nfs ] && [ "$ROOT_KIND" != iscsi ]; then
		FILL_ERROR="qrm.fill needs a root on NFS or iSCSI"
		return 2
	fi
	# The volume is exported to this machine alone: mounted read-write to be filled.
	saved_overlay=$OVERLAY
	saved_mode=$ROOT_MODE
	OVERLAY=
	ROOT_MODE=rw
	make_root
	rc=$?
	OVERLAY=$saved_overlay
	ROOT_MODE=$saved_mode
	[ $rc -eq 0 ] || return 1
	if [ -z "$TOKEN" ] && ! register; then
		ROOT_ERROR="cannot register with the server to report the filling"
		release_root
		return 1
	fi
	STATE=filling
	log "filling the image of virtual environment ${VE:-?} from ${FILL_DEVICE:-the first local root filesystem}"
	if ! fill_find_local; then
		release_root
		return 2
	fi
	log "copying $FILL_DEVICE onto the network root"
	fill_copy /qrm-local /newroot
	rc=$?
	umount /qrm-local 2>/dev/null
	release_root
	[ $rc -eq 0 ] || return 2
	FILL_RESULT=done
	log "filled from $FILL_DEVICE ($FILL_BYTES bytes); reporting it"
	report_fill
	FILL_RESULT=
	STATE=idle
	return 0
}

# report_fill: the filling's outcome (FILL_RESULT), until the server has it.
report_fill() {
	while :; do
		if [ -z "$TOKEN" ] && ! register; then
			sleep 5
			continue
		fi
		fill_heartbeat
		case $? in
		0) return 0 ;;
		2) TOKEN= ;;
		esac
		sleep 5
	done
}

# make_root: the VE's root filesystem at /newroot; ROOT_ERROR says why not.
make_root() {
	if [ -n "$ROOT_ERROR" ]; then return 1; fi
	case $ROOT_KIND in
	archive)
		fetch_rootfs && return 0
		ROOT_ERROR=$ROOTFS_ERROR
		return 1
		;;
	nfs) mount_nfs_root ;;
	iscsi) mount_iscsi_root ;;
	*)
		ROOT_ERROR="no root filesystem on the command line (qrm.rootfs, nfsroot or qrm.iscsi)"
		return 1
		;;
	esac
}

switch_to_ve() {
	mkdir -p /newroot/qrm /newroot/proc /newroot/sys /newroot/dev /newroot/run /newroot/tmp /newroot/etc
	# The agent and busybox live in RAM, as does /run: nothing of this boot lands in the image.
	mount -t tmpfs -o mode=0755,size=16m qrm-agent /newroot/qrm
	mount -t tmpfs -o mode=0755 qrm-run /newroot/run
	if [ -n "$OVERLAY" ]; then
		# The image below the overlay, where the VE (and the agent's root check) can see it.
		mkdir -p /newroot/run/qrm/lower
		mount -o move /qrm-lower /newroot/run/qrm/lower || log "cannot move the image below the overlay into the VE"
	fi
	mkdir -p /newroot/qrm/bin
	cp /bin/busybox /newroot/qrm/bin/busybox
	cp "$0" /newroot/qrm/agent.sh
	chmod 0755 /newroot/qrm/bin/busybox /newroot/qrm/agent.sh
	[ -f /etc/resolv.conf ] && [ ! -e /newroot/etc/resolv.conf ] && cp /etc/resolv.conf /newroot/etc/resolv.conf
	mkdir -p /newroot/run/qrm
	current_ip >/newroot/run/qrm/ip
	# The VE's agent proves with it that it is this machine when it registers.
	[ -s "$RUN/token" ] && (umask 077 && cp "$RUN/token" /newroot/run/qrm/token)
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
		fi
		backoff=5
		wait_for_revert
		while [ "$MODE" = ve ]; do
			if [ -n "$FILL" ]; then
				fill_image
				case $? in
				0) FILL= ;;
				2)
					STATE=failed
					REASON="cannot fill the image of virtual environment ${VE:-?} from the local disk ($FILL_ERROR)"
					FILL_RESULT=failed
					log "$REASON"
					report_fill # the server releases this machine and orders a reboot
					FILL_RESULT=
					break
					;;
				esac
			fi
			if [ -z "$FILL" ] && make_root; then
				switch_to_ve
			fi
			if [ "$ROOT_KIND" = archive ]; then
				report_failure "cannot fetch the root filesystem of virtual environment ${VE:-?} ($ROOT_ERROR)"
			else
				report_failure "cannot mount the root filesystem of virtual environment ${VE:-?} ($ROOT_ERROR)"
			fi
			read_root_args
			log "cannot boot virtual environment ${VE:-?}; retrying in $backoff s"
			sleep $backoff
			backoff=$((backoff * 2))
			[ $backoff -gt 60 ] && backoff=60
		done
	fi
	[ "$STATE" = failed ] || STATE=idle
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
	if [ "${1:-}" = --root-plan ] && [ "$$" -ne 1 ]; then
		# What a VE boot would mount, from QRM_AGENT_CMDLINE (for tests).
		read_cmdline 2>/dev/null
		case $ROOT_KIND in
		nfs) where="$NFS_SERVER:$NFS_PATH options=$NFS_OPTIONS" ;;
		iscsi) where="$ISCSI_ADDR:$ISCSI_PORT lun=$ISCSI_LUN target=$ISCSI_TARGET initiator=$INITIATOR fstype=$FSTYPE" ;;
		archive) where="$ROOTFS" ;;
		*) where= ;;
		esac
		printf 'kind=%s mode=%s overlay=%s %s\nerror=%s\n' "$ROOT_KIND" "$ROOT_MODE" "$OVERLAY" "$where" "$ROOT_ERROR"
		[ -n "$FILL" ] && printf 'fill=%s device=%s mb=%s error=%s\n' "$FILL" "$FILL_DEVICE" "$FILL_MB" "$FILL_ERROR"
		exit 0
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
