#!/bin/sh
# Install or upgrade mpudp on OpenWrt (procd) or a systemd host.
#
#   sh packaging/install.sh [openwrt|systemd|files]
#
# Without an argument the kind is guessed: /etc/openwrt_release -> openwrt,
# a running systemd -> systemd, else files (no service file).
#
# It copies mpudp.py and keygen.py to $PREFIX/share/mpudp, creates /etc/mpudp
# (mode 700) with config.json.example, and config.json from it if there is
# none (an existing config is never touched), installs the init script (with
# uci2json.py and /etc/config/mpudp, kept if there is one, and the user mpudp)
# or the systemd unit, and prints the next steps. It starts and restarts nothing.
# packaging/openwrt/Makefile installs the same files as an OpenWrt package.
#
# Environment:
#   DESTDIR           stage into this directory instead of / (packages, tests):
#                     then no user is created, nothing is chowned, no service
#                     manager is called
#   PREFIX            default /usr
#   PYTHON            the interpreter the service runs, default /usr/bin/python3
#   SYSTEMD_UNIT_DIR  default /etc/systemd/system
set -eu

DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/usr}"
PYTHON="${PYTHON:-/usr/bin/python3}"
SYSTEMD_UNIT_DIR="${SYSTEMD_UNIT_DIR:-/etc/systemd/system}"
SHARE="$PREFIX/share/mpudp"	# where the service finds the daemon (without DESTDIR)
SRC="$(cd "$(dirname "$0")/.." && pwd)"

die() { echo "install.sh: $*" >&2; exit 1; }

kind="${1:-}"
if [ -z "$kind" ]; then
	if [ -f /etc/openwrt_release ]; then kind=openwrt
	elif [ -d /run/systemd/system ]; then kind=systemd
	else kind=files
	fi
fi
case "$kind" in
openwrt|systemd|files) ;;
*) die "usage: sh packaging/install.sh [openwrt|systemd|files]" ;;
esac
if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
	die "run me as root (or set DESTDIR to stage the files elsewhere)"
fi
for f in mpudp.py keygen.py config.json LICENSE packaging/openwrt/mpudp.init \
		packaging/openwrt/uci2json.py packaging/openwrt/mpudp.config \
		packaging/systemd/mpudp@.service packaging/systemd/mpudp.sysusers; do
	[ -f "$SRC/$f" ] || die "$SRC/$f is missing: run me from an mpudp checkout"
done

# put SRC DEST MODE: copy through a temporary file and rename, so a reader
# never sees half a file (a running daemon keeps the code it loaded).
put() {
	cp "$1" "$2.new.$$"
	chmod "$3" "$2.new.$$"
	mv -f "$2.new.$$" "$2"
}

# put_paths SRC DEST MODE: put, with this install's paths in the file.
put_paths() {
	sed -e "s|/usr/share/mpudp|$SHARE|g" -e "s|/usr/bin/python3|$PYTHON|g" "$1" > "$2.new.$$"
	chmod "$3" "$2.new.$$"
	mv -f "$2.new.$$" "$2"
}

umask 022
mkdir -p "$DESTDIR$SHARE"
put "$SRC/mpudp.py" "$DESTDIR$SHARE/mpudp.py" 644
put "$SRC/keygen.py" "$DESTDIR$SHARE/keygen.py" 644
put "$SRC/README.md" "$DESTDIR$SHARE/README.md" 644
put "$SRC/LICENSE" "$DESTDIR$SHARE/LICENSE" 644
rm -rf "$DESTDIR$SHARE/__pycache__"	# left by keygen.py's import of an older mpudp.py
# The daemon runs from cached bytecode (it re-executes itself as `import mpudp`):
# compile it now, while this directory is writable, to save ~6 MB of its memory.
if command -v "$PYTHON" >/dev/null 2>&1; then
	"$PYTHON" -m compileall -q "$DESTDIR$SHARE/mpudp.py" >/dev/null 2>&1 || true
fi
echo "installed $DESTDIR$SHARE/mpudp.py, keygen.py, README.md, LICENSE"

# The config holds a private key: the directory is 700, the files 600.
etc="$DESTDIR/etc/mpudp"
mkdir -p "$etc"
chmod 700 "$etc"
(umask 077; put "$SRC/config.json" "$etc/config.json.example" 600)
if [ -e "$etc/config.json" ]; then
	echo "kept $etc/config.json"
	new_config=
else
	(umask 077; cp "$SRC/config.json" "$etc/config.json")
	chmod 600 "$etc/config.json"
	echo "created $etc/config.json (placeholders: edit it before starting)"
	new_config=1
fi

case "$kind" in
openwrt)
	mkdir -p "$DESTDIR/etc/init.d" "$DESTDIR/etc/config"
	put_paths "$SRC/packaging/openwrt/mpudp.init" "$DESTDIR/etc/init.d/mpudp" 755
	put "$SRC/packaging/openwrt/uci2json.py" "$DESTDIR$SHARE/uci2json.py" 644
	echo "installed $DESTDIR/etc/init.d/mpudp, $DESTDIR$SHARE/uci2json.py"
	if [ -e "$DESTDIR/etc/config/mpudp" ]; then
		echo "kept $DESTDIR/etc/config/mpudp"
	else
		(umask 077; put "$SRC/packaging/openwrt/mpudp.config" "$DESTDIR/etc/config/mpudp" 600)
		echo "created $DESTDIR/etc/config/mpudp (every section disabled)"
	fi
	if [ -z "$DESTDIR" ] && [ -f /lib/functions.sh ]; then
		# The user the relays run as (the package's USERID:=mpudp:mpudp).
		. /lib/functions.sh
		group_exists mpudp || group_add_next mpudp >/dev/null
		user_exists mpudp || user_add mpudp "" "$(sed -n 's/^mpudp:[^:]*:\([0-9]*\):.*/\1/p' /etc/group)" \
			"mpudp relay" /var/run/mpudp /bin/false
	fi
	;;
systemd)
	mkdir -p "$DESTDIR$SYSTEMD_UNIT_DIR" "$DESTDIR/etc/sysusers.d"
	put_paths "$SRC/packaging/systemd/mpudp@.service" "$DESTDIR$SYSTEMD_UNIT_DIR/mpudp@.service" 644
	put "$SRC/packaging/systemd/mpudp.sysusers" "$DESTDIR/etc/sysusers.d/mpudp.conf" 644
	echo "installed $DESTDIR$SYSTEMD_UNIT_DIR/mpudp@.service, $DESTDIR/etc/sysusers.d/mpudp.conf"
	if [ -z "$DESTDIR" ]; then
		# The service runs as mpudp, which must read its configs.
		command -v systemd-sysusers >/dev/null || die "no systemd-sysusers: is this a systemd host?"
		systemd-sysusers /etc/sysusers.d/mpudp.conf
		chown -R mpudp:mpudp "$etc"
		if [ -d /run/systemd/system ]; then
			systemctl daemon-reload
		fi
	fi
	;;
esac

if [ -z "$DESTDIR" ] && [ ! -x "$PYTHON" ]; then
	case "$kind" in
	openwrt) echo "warning: no $PYTHON: opkg update && opkg install python3-light" ;;
	*) echo "warning: no $PYTHON (Python 3.7 or later): install it, or rerun with PYTHON=/path/to/python3" ;;
	esac
fi

echo
echo "Next steps:"
cat <<STEPS
  1. Keys, one pair per end (the server's and each client's):
       $PYTHON $SHARE/keygen.py
  2. Edit /etc/mpudp/config.json ("mode": "client" or "server", keys, addresses;
     $SHARE/README.md lists every key), then check it:
       $PYTHON $SHARE/mpudp.py -config=/etc/mpudp/config.json --check
STEPS
case "$kind" in
openwrt) cat <<STEPS
  3. Or configure it with uci instead: /etc/config/mpudp has a client, a server
     and a JSON-file section, all disabled (option config '/etc/mpudp/config.json'
     runs the file above):
       uci set mpudp.json.enabled=1 && uci commit mpudp
       /etc/init.d/mpudp check
     Start it now and at every boot; its log; a reload after an edit:
       /etc/init.d/mpudp enable && /etc/init.d/mpudp start
       logread -e mpudp
       /etc/init.d/mpudp reload     # or: uci commit mpudp && reload_config
  4. On a server, open its UDP port (the port of its listen_addr, e.g. 5000):
       uci add firewall rule
       uci set firewall.@rule[-1].name='Allow-mpudp'
       uci set firewall.@rule[-1].src='wan'
       uci set firewall.@rule[-1].proto='udp'
       uci set firewall.@rule[-1].dest_port='5000'
       uci set firewall.@rule[-1].target='ACCEPT'
       uci commit firewall && /etc/init.d/firewall reload
STEPS
	;;
systemd) cat <<STEPS
  3. Start it now and at every boot (mpudp@NAME runs /etc/mpudp/NAME.json, as
     user mpudp: a config you add yourself needs chown mpudp:mpudp, chmod 600):
       systemctl enable --now mpudp@config
       journalctl -u mpudp@config -f
       systemctl reload mpudp@config
  4. On a server, open its UDP port (the port of server.listen_addr), e.g.
       ufw allow 5000/udp    or    firewall-cmd --permanent --add-port=5000/udp
STEPS
	;;
files) cat <<STEPS
  3. Run it (in the foreground; SIGHUP reloads, SIGTERM stops):
       $PYTHON $SHARE/mpudp.py -config=/etc/mpudp/config.json
STEPS
	;;
esac
if [ -z "$new_config" ]; then
	echo "An mpudp already running keeps its old code until it is restarted."
fi
