#!/usr/bin/env bash
# The .deb on a pristine Debian 12, twice: packaging/test-deb.sh in a fresh
# chroot with no Asterisk user, then in another where an asterisk user and
# group were made before popivr was installed (root; needs the Debian
# mirror, as any admin's install does, for ca-certificates and the rest).
#
#   packaging/test-deb-clean.sh [target/debian/popivr_*.deb]
#
# The base system (debootstrap --variant=minbase bookworm, plus what a
# standard Debian 12 server has that the checks use: man-db, iproute2,
# systemd) is made once and kept in ~/.cache/popivr (POPIVR_CACHE); each
# case unpacks a fresh copy and deletes it afterwards. The mounts live in
# a mount namespace of their own and go with it.
set -euo pipefail
deb=${1:+$(realpath "$1")}
cd "$(dirname "$0")/.."
deb=${deb:-$(realpath "$(ls -t target/debian/popivr_*.deb | head -1)")}
mirror=${POPIVR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=${POPIVR_CACHE:-$HOME/.cache/popivr}
base=$cache/debian12-minbase.tar

if [ ! -s "$base" ]; then
    command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
    mkdir -p "$cache"
    tmp=$(mktemp -d /tmp/popivr-debootstrap.XXXXXX)
    chmod 755 "$tmp" # the system's root: apt's _apt user walks it
    echo "making a Debian 12 base system in $base (once per machine) ..."
    debootstrap --variant=minbase bookworm "$tmp" "$mirror" >"$tmp.log" 2>&1 ||
        { tail -20 "$tmp.log"; rm -rf "$tmp" "$tmp.log"; exit 1; }
    cp /etc/resolv.conf "$tmp/etc/resolv.conf"
    unshare --mount --fork sh -c "
        mount -t proc proc '$tmp/proc' && mount --rbind /dev '$tmp/dev' &&
        chroot '$tmp' sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends man-db iproute2 systemd >/dev/null && apt-get clean'" ||
        { rm -rf "$tmp" "$tmp.log"; exit 1; }
    tar -C "$tmp" -cf "$base.part" . && mv "$base.part" "$base"
    rm -rf "$tmp" "$tmp.log"
fi

run_case() { # $1: name, $2: what to do in the chroot before the checks
    local root
    root=$(mktemp -d /tmp/popivr-clean.XXXXXX)
    trap 'rm -rf "$root"' RETURN
    tar -C "$root" -xf "$base"
    chmod 755 "$root" # the system's root: apt's _apt user walks it
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    mkdir -p "$root/tmp/popivr/packaging"
    cp packaging/test-deb.sh "$root/tmp/popivr/packaging/"
    cp "$deb" "$root/tmp/popivr/"
    echo "== $1"
    unshare --mount --fork sh -c "
        mount -t proc proc '$root/proc' && mount --rbind /dev '$root/dev' &&
        chroot '$root' sh -c 'export DEBIAN_FRONTEND=noninteractive; apt-get update -q >/dev/null && $2
            packaging=/tmp/popivr/packaging; cd /tmp/popivr && \$packaging/test-deb.sh /tmp/popivr/$(basename "$deb")'"
}

run_case "Debian 12, no Asterisk user" ":;"
run_case "Debian 12, an asterisk user made before popivr" \
    "useradd --system --user-group --no-create-home --shell /usr/sbin/nologin asterisk;"
echo "the .deb passed on both clean systems"
