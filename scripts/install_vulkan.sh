#!/usr/bin/env bash
# Make sure a Vulkan driver is available for SAPIEN / ManiSkill3 rendering.
#
# Idempotent; called by `make install`.  It never fails the install because
# of a missing driver: the Python side reports that at run time.
#
#   1. `nvidia-smi` works          -> the NVIDIA driver provides Vulkan; done.
#   2. not Linux, or no dpkg/apt   -> print how to get a driver; done.
#   3. lavapipe ICD present and mesa-vulkan-drivers >= 24 (and the Vulkan
#      loader libvulkan.so.1 present) -> "ok"; done.
#   4. root (or passwordless sudo) -> on Debian bookworm add bookworm-backports
#      if absent, apt-get update, install mesa-vulkan-drivers + libvulkan1
#      (from bookworm-backports on bookworm).
#   5. otherwise                   -> print the exact commands to run as root.
#
# Options:
#   --dry-run   print the commands of step 4 instead of running them
#   --force     skip checks 1 and 3 (with --dry-run: show the install path)
#   -h, --help  this text
set -euo pipefail

MIN_MESA_MAJOR=24
BACKPORTS_LIST=/etc/apt/sources.list.d/bookworm-backports.list

DRY_RUN=0
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install_vulkan.sh: unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

say() { echo "install_vulkan: $*"; }
warn() { echo "install_vulkan: WARNING: $*" >&2; }

# --- 1. NVIDIA driver -------------------------------------------------------
if [[ $FORCE -eq 0 ]] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    say "nvidia-smi works: the NVIDIA driver provides Vulkan, nothing to install."
    if ! ls /usr/share/vulkan/icd.d/nvidia_icd*.json /etc/vulkan/icd.d/nvidia_icd*.json >/dev/null 2>&1; then
        warn "no nvidia_icd.json found in /usr/share/vulkan/icd.d or /etc/vulkan/icd.d;" \
             "if SAPIEN cannot create a Vulkan device, install the driver's Vulkan ICD" \
             "(e.g. the libnvidia-gl package matching the driver) and libvulkan1."
    fi
    exit 0
fi

# --- 2. unsupported platform ------------------------------------------------
if [[ "$(uname -s)" != "Linux" ]]; then
    say "not Linux ($(uname -s)): install a Vulkan driver yourself" \
        "(macOS: MoltenVK via the LunarG Vulkan SDK; Windows: the GPU vendor's driver)." \
        "Nothing done."
    exit 0
fi
if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    say "not a Debian/apt system: install a Vulkan driver with your package manager," \
        "either the GPU vendor's driver or Mesa >= ${MIN_MESA_MAJOR} with lavapipe (software" \
        "Vulkan; e.g. Fedora: mesa-vulkan-drivers vulkan-loader; Arch: vulkan-swrast" \
        "vulkan-icd-loader).  Nothing done."
    exit 0
fi

# --- 3. already ok? ---------------------------------------------------------
pkg_version() {  # prints the installed version of a package, or nothing
    local status
    status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)
    [[ "$status" == *" installed" ]] || return 0
    dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true
}
have_lavapipe_icd() { compgen -G '/usr/share/vulkan/icd.d/lvp_icd*.json' >/dev/null; }
have_loader() {
    [[ -n "$(pkg_version libvulkan1)" ]] || ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1 '
}
mesa_ok() {
    local v
    v=$(pkg_version mesa-vulkan-drivers)
    [[ -n "$v" ]] && dpkg --compare-versions "$v" ge "$MIN_MESA_MAJOR"
}
vulkan_ok() { have_lavapipe_icd && mesa_ok && have_loader; }

if [[ $FORCE -eq 0 ]] && vulkan_ok; then
    say "ok (lavapipe ICD present, mesa-vulkan-drivers $(pkg_version mesa-vulkan-drivers), libvulkan1 present)"
    exit 0
fi
[[ $FORCE -eq 1 ]] && say "--force: not checking for an existing driver"
say "current state: lavapipe ICD $(have_lavapipe_icd && echo present || echo missing)," \
    "mesa-vulkan-drivers '$(pkg_version mesa-vulkan-drivers)' (need >= ${MIN_MESA_MAJOR})," \
    "Vulkan loader $(have_loader && echo present || echo missing)."

# --- 4./5. install ----------------------------------------------------------
CODENAME=""
if [[ -r /etc/os-release ]]; then
    CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
fi

has_backports_source() {
    grep -qsE '^[^#]*bookworm-backports' /etc/apt/sources.list \
        /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null
}
debian_mirror() {  # the mirror that the existing bookworm source uses
    local uri=""
    # deb822 (*.sources): the first URI of a stanza whose Suites has "bookworm"
    uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '
        BEGIN { RS = "" }
        /(^|\n)Suites:[^\n]*[ \t]bookworm([ \t]|\n|$)/ {
            if (match($0, /(^|\n)URIs:[ \t]*[^ \t\n]+/)) {
                s = substr($0, RSTART, RLENGTH); sub(/^\n?URIs:[ \t]*/, "", s); print s; exit
            }
        }' || true)
    if [[ -z "$uri" ]]; then
        uri=$(grep -hsE '^deb[[:space:]]+[^#]*[[:space:]]bookworm[[:space:]]' \
                  /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
              sed -E 's/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//' | awk '{print $1}' | head -n1 || true)
    fi
    echo "$uri"
}

CMDS=()
if [[ "$CODENAME" == "bookworm" ]]; then
    if ! has_backports_source; then
        MIRROR=$(debian_mirror)
        if [[ -z "$MIRROR" ]]; then
            say "no bookworm apt source found to derive a bookworm-backports source from;" \
                "add bookworm-backports to apt's sources and rerun.  Nothing done."
            exit 0
        fi
        CMDS+=("echo 'deb $MIRROR bookworm-backports main' > $BACKPORTS_LIST")
    fi
    CMDS+=("apt-get update")
    CMDS+=("DEBIAN_FRONTEND=noninteractive apt-get install -y -t bookworm-backports mesa-vulkan-drivers libvulkan1")
else
    # Other Debian/Ubuntu releases: their own mesa (trixie and newer have >= 24).
    CMDS+=("apt-get update")
    CMDS+=("DEBIAN_FRONTEND=noninteractive apt-get install -y mesa-vulkan-drivers libvulkan1")
fi

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
        SUDO="sudo"
    else
        say "not root and no passwordless sudo: nothing installed.  Run as root:"
        for c in "${CMDS[@]}"; do echo "    $c"; done
        say "(until then, rendering with SAPIEN fails and the Python side reports the missing driver)"
        exit 0
    fi
fi

for c in "${CMDS[@]}"; do
    if [[ $DRY_RUN -eq 1 ]]; then
        echo "[dry-run] ${SUDO:+$SUDO }$c"
        continue
    fi
    say "running: ${SUDO:+$SUDO }$c"
    if ! ${SUDO:+$SUDO} bash -c "$c"; then
        warn "command failed: $c"
        warn "Vulkan driver NOT installed; rendering will fail until it is (the Python side reports it)."
        exit 0
    fi
done
[[ $DRY_RUN -eq 1 ]] && exit 0

if vulkan_ok; then
    say "ok (installed mesa-vulkan-drivers $(pkg_version mesa-vulkan-drivers))"
else
    warn "after the install: lavapipe ICD $(have_lavapipe_icd && echo present || echo missing)," \
         "mesa-vulkan-drivers '$(pkg_version mesa-vulkan-drivers)' (need >= ${MIN_MESA_MAJOR})," \
         "Vulkan loader $(have_loader && echo present || echo missing); rendering may fail."
fi
exit 0
