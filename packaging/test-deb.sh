#!/usr/bin/env bash
# The .deb as an admin meets it (root; it installs, removes and purges the
# package). Run after packaging/build-deb.sh, on a machine without popivr:
#
#   packaging/test-deb.sh [target/debian/popivr_*.deb]
#
# packaging/test-deb-clean.sh runs it on a pristine Debian 12 (chroot),
# once with no Asterisk user and once with one made before the install.
#
# Two cases, chosen by the machine:
# - no asterisk group yet (Debian 12 ships no Asterisk): the install leaves
#   the config root:root 640 and says so; then an asterisk user appears (as
#   a source install makes it) and dpkg-reconfigure hands the config to it;
# - an asterisk user already there: the install gives it the config at once.
# Either way the asterisk user ends up able to read the config, and:
# man pages render with EXAMPLES kept line by line, check --offline names
# the sample's placeholders, every /usr/share/doc/popivr path the unit, man
# pages, --help, snippets and sample name is installed, the unit has no
# RemoveIPC (and systemd-analyze accepts it where systemd is installed),
# serve with the defaults listens on this host only, an edited conffile
# survives reinstall and remove/install, purge removes it. Leaves the
# machine as it found it (package purged, a user it added deleted).
set -euo pipefail
deb=${1:+$(realpath "$1")}
cd "$(dirname "$0")/.."
deb=${deb:-$(realpath "$(ls -t target/debian/popivr_*.deb | head -1)")}
conf=/etc/asterisk/popivr.conf
fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }
mode() { stat -c %U:%G:%a "$conf"; }
# What Asterisk (running as the asterisk user) sees.
asterisk_reads() { runuser -u asterisk -- head -c1 "$conf" >/dev/null 2>&1; }

if dpkg -s popivr >/dev/null 2>&1; then
    fail "popivr is installed already: run this where it is not"
fi
added_user=""
cleanup() {
    apt-get purge -y -qq popivr >/dev/null 2>&1 || true
    [ -n "$added_user" ] && userdel asterisk 2>/dev/null || true
}
trap cleanup EXIT

if getent group asterisk >/dev/null; then
    getent passwd asterisk >/dev/null || fail "an asterisk group but no asterisk user: not a case Asterisk makes"
    out=$(apt-get install -y -qq "$deb" 2>&1) || fail "the install failed: $out"
    [ "$(mode)" = root:asterisk:640 ] || fail "config is $(mode) with an asterisk user present"
    grep -q "no asterisk group yet" <<<"$out" && fail "the install said there is no asterisk group"
    asterisk_reads || fail "the asterisk user cannot read $conf"
    ok "installed with an asterisk user present: root:asterisk 640, Asterisk can read it"
else
    out=$(apt-get install -y -qq "$deb" 2>&1) || fail "the install failed: $out"
    [ "$(mode)" = root:root:640 ] || fail "config is $(mode)"
    grep -q "no asterisk group yet" <<<"$out" || fail "the install did not say the config stays root:root"
    ok "installed before an asterisk group: root:root 640, and said so"
    # Asterisk arrives later (a source install's `make install` + its user).
    useradd --system --user-group --no-create-home --shell /usr/sbin/nologin asterisk
    added_user=yes
    dpkg-reconfigure popivr >/dev/null 2>&1
    [ "$(mode)" = root:asterisk:640 ] || fail "after the user appeared: $(mode)"
    asterisk_reads || fail "the asterisk user cannot read $conf after dpkg-reconfigure"
    ok "once Asterisk's user exists, dpkg-reconfigure gives it the config (root:asterisk 640), readable"
fi

# Every document the package points an admin to.
named=$({
    cat /usr/lib/systemd/system/popivr.service "$conf" /usr/share/doc/popivr/dialplan/*
    for page in /usr/share/man/man1/popivr*.1.gz; do zcat "$page"; done
    popivr --help
    for sub in run check serve; do popivr "$sub" --help; done
} 2>/dev/null | grep -oE '/usr/share/doc/popivr/[A-Za-z0-9_./-]*[A-Za-z0-9_]' | sort -u)
[ -n "$named" ] || fail "found no /usr/share/doc/popivr path named anywhere: the search is broken"
for doc in $named; do
    [ -e "$doc" ] || fail "$doc is named but not installed"
done
for doc in README.md SECURITY.md serve.md dialplan/ivr-daemon.conf; do
    [ -f "/usr/share/doc/popivr/$doc" ] || fail "/usr/share/doc/popivr/$doc missing"
done
ok "every document named is installed: $(tr '\n' ' ' <<<"$named")"
dpkg -s popivr | grep -q '^Depends:.*ca-certificates' || fail "no dependency on ca-certificates"
[ -s /etc/ssl/certs/ca-certificates.crt ] || fail "the system CA store is missing after the install"
ok "depends on ca-certificates, and the CA store is there"
unit=/usr/lib/systemd/system/popivr.service
grep -q '^RemoveIPC=' "$unit" && fail "the unit sets RemoveIPC (Asterisk's IPC objects)"
grep -q 'serve$' "$unit" || fail "the unit's ExecStart changed: check its listen default"
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify "$unit" || fail "systemd-analyze verify rejects the unit"
    ok "unit: no RemoveIPC, systemd-analyze verify accepts it"
else
    ok "unit: no RemoveIPC (no systemd here to verify it)"
fi

page=$(MANWIDTH=100 man popivr 2>/dev/null)
grep -Eq '^ +popivr check +validate /etc/asterisk/popivr.conf and log in$' <<<"$page" ||
    fail "popivr(1) EXAMPLES reflowed"
for p in popivr-check popivr-run popivr-serve; do
    man -w "$p" >/dev/null || fail "no man page $p"
done
ok "man pages render, EXAMPLES line by line"

# As Asterisk would run it: the asterisk user, the installed config.
if runuser -u asterisk -- popivr check --offline >/tmp/popivr-check.$$ 2>&1; then
    fail "check --offline passed on the untouched sample"
fi
grep -q "placeholder: \[pbx\] secret: still the sample's \`CHANGE-ME\`" /tmp/popivr-check.$$ ||
    fail "check did not name the secret placeholder: $(cat /tmp/popivr-check.$$)"
rm -f /tmp/popivr-check.$$
ok "check --offline (as the asterisk user) names the sample's placeholders and fails"

# In a network namespace of its own: nothing else's port 2949 interferes.
listening=$(unshare --net sh -c '
    ip link set lo up
    timeout 3 popivr --config '"$conf"' -v serve 2>/dev/null &
    sleep 1.5
    ss -ltnH "sport = :2949" | awk "{print \$4}" | sort | tr "\n" " "
    wait')
[ "$listening" = "127.0.0.1:2949 [::1]:2949 " ] || [ "$listening" = "127.0.0.1:2949 " ] ||
    fail "serve with the defaults listens on: $listening"
ok "serve with the defaults listens on $listening"

sed -i 's/CHANGE-ME/edited-secret/' "$conf"
apt-get install -y -qq --reinstall "$deb" >/dev/null 2>&1
grep -q edited-secret "$conf" || fail "reinstall lost the edit"
apt-get remove -y -qq popivr >/dev/null 2>&1
apt-get install -y -qq "$deb" >/dev/null 2>&1
grep -q edited-secret "$conf" || fail "remove + install lost the edit"
[ "$(mode)" = root:asterisk:640 ] || fail "after reinstall: $(mode)"
ok "an edited conffile survives reinstall and remove + install"
apt-get purge -y -qq popivr >/dev/null 2>&1
[ ! -e "$conf" ] || fail "purge left $conf"
apt-get install -y -qq "$deb" >/dev/null 2>&1
grep -q CHANGE-ME "$conf" || fail "install after purge did not bring the sample back"
[ "$(mode)" = root:asterisk:640 ] || fail "after purge + install: $(mode)"
asterisk_reads || fail "the asterisk user cannot read $conf after purge + install"
ok "purge removes it; a new install brings the sample back, readable by Asterisk"
echo "all .deb checks passed"
