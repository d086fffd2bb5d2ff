#!/usr/bin/env bash
# The .deb as an admin meets it, on this machine (root; it installs,
# removes and purges the package and adds, then deletes, an `asterisk`
# group when none exists). Run after packaging/build-deb.sh:
#
#   packaging/test-deb.sh [target/debian/popivr_*.deb]
#
# Checks: install before any asterisk group (the config stays root:root
# 640 and the install says so), man pages render with EXAMPLES kept line
# by line, check --offline names the sample's placeholders, the group
# appears and dpkg-reconfigure hands the config to it, an edited conffile
# survives reinstall and remove/install, purge removes it, the documents
# the package names are in it, the unit has no RemoveIPC, and serve with
# the defaults listens on this host only. Leaves the machine as it found
# it (package purged, a group it added deleted).
set -euo pipefail
cd "$(dirname "$0")/.."

deb=${1:-$(ls -t target/debian/popivr_*.deb | head -1)}
conf=/etc/asterisk/popivr.conf
fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }

if getent group asterisk >/dev/null; then
    fail "an asterisk group exists already: run this where Asterisk is not installed"
fi
added_group=""
cleanup() {
    apt-get purge -y -qq popivr >/dev/null 2>&1 || true
    [ -n "$added_group" ] && groupdel asterisk 2>/dev/null || true
}
trap cleanup EXIT

out=$(apt-get install -y -qq "./$deb" 2>&1)
[ "$(stat -c %U:%G:%a "$conf")" = root:root:640 ] || fail "config is $(stat -c %U:%G:%a "$conf")"
grep -q "no asterisk group yet" <<<"$out" || fail "the install did not say the config stays root:root"
ok "installed before an asterisk group: root:root 640, and said so"

for doc in README.md SECURITY.md serve.md dialplan/ivr-daemon.conf; do
    [ -f "/usr/share/doc/popivr/$doc" ] || fail "/usr/share/doc/popivr/$doc missing"
done
ok "the documents the unit, man pages and snippets name are installed"
dpkg -s popivr | grep -q '^Depends:.*ca-certificates' || fail "no dependency on ca-certificates"
ok "depends on ca-certificates"
unit=/usr/lib/systemd/system/popivr.service
grep -q '^RemoveIPC=' "$unit" && fail "the unit sets RemoveIPC (Asterisk's IPC objects)"
grep -q 'serve$' "$unit" || fail "the unit's ExecStart changed: check its listen default"
ok "unit: no RemoveIPC"

page=$(MANWIDTH=100 man popivr 2>/dev/null)
grep -Eq '^ +popivr check +validate /etc/asterisk/popivr.conf and log in$' <<<"$page" ||
    fail "popivr(1) EXAMPLES reflowed"
for p in popivr-check popivr-run popivr-serve; do
    man -w "$p" >/dev/null || fail "no man page $p"
done
ok "man pages render, EXAMPLES line by line"

if popivr check --offline >/tmp/popivr-check.$$ 2>&1; then
    fail "check --offline passed on the untouched sample"
fi
grep -q "placeholder: \[pbx\] secret: still the sample's \`CHANGE-ME\`" /tmp/popivr-check.$$ ||
    fail "check did not name the secret placeholder"
rm -f /tmp/popivr-check.$$
ok "check --offline names the sample's placeholders and fails"

timeout 3 popivr --config "$conf" -v serve 2>/tmp/popivr-serve.$$ &
sleep 1.5
listening=$(ss -ltnH 'sport = :2949' | awk '{print $4}' | sort | tr '\n' ' ')
wait || true
[ "$listening" = "127.0.0.1:2949 [::1]:2949 " ] || [ "$listening" = "127.0.0.1:2949 " ] ||
    fail "serve with the defaults listens on: $listening"
rm -f /tmp/popivr-serve.$$
ok "serve with the defaults listens on $listening"

groupadd --system asterisk
added_group=yes
dpkg-reconfigure popivr >/dev/null 2>&1
[ "$(stat -c %U:%G:%a "$conf")" = root:asterisk:640 ] || fail "after the group: $(stat -c %U:%G:%a "$conf")"
ok "once the group exists, dpkg-reconfigure gives it the config (root:asterisk 640)"

sed -i 's/CHANGE-ME/edited-secret/' "$conf"
apt-get install -y -qq --reinstall "./$deb" >/dev/null 2>&1
grep -q edited-secret "$conf" || fail "reinstall lost the edit"
apt-get remove -y -qq popivr >/dev/null 2>&1
apt-get install -y -qq "./$deb" >/dev/null 2>&1
grep -q edited-secret "$conf" || fail "remove + install lost the edit"
[ "$(stat -c %U:%G:%a "$conf")" = root:asterisk:640 ] || fail "after reinstall: $(stat -c %U:%G:%a "$conf")"
ok "an edited conffile survives reinstall and remove + install"
apt-get purge -y -qq popivr >/dev/null 2>&1
[ ! -e "$conf" ] || fail "purge left $conf"
apt-get install -y -qq "./$deb" >/dev/null 2>&1
grep -q CHANGE-ME "$conf" || fail "install after purge did not bring the sample back"
[ "$(stat -c %U:%G:%a "$conf")" = root:asterisk:640 ] || fail "after purge + install: $(stat -c %U:%G:%a "$conf")"
ok "purge removes it; a new install brings the sample back, group asterisk"
echo "all .deb checks passed"
