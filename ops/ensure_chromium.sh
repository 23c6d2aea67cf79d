#!/usr/bin/env bash
# Make sure a headless-capable Chromium is installed; the report browser tests need it.
#
# Root: installs Debian's `chromium` package if it is missing (apt-get update only when
# the package is not known to apt yet).  Not root and missing: says what to run, exits 1.
# Either way, prints the path and version of the Chromium it found or installed.
set -euo pipefail

find_chromium() {
    if [[ -x /usr/bin/chromium ]]; then
        echo /usr/bin/chromium
    else
        command -v chromium || true
    fi
}

chromium_path="$(find_chromium)"

if [[ -z "${chromium_path}" ]]; then
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "ensure_chromium: chromium is not installed and we are not root." >&2
        echo "ensure_chromium: run 'sudo $0' (or 'sudo apt-get install chromium') and try again." >&2
        exit 1
    fi
    # Refresh the package lists only when apt does not know a candidate for chromium yet:
    # a fresh container has empty lists, a long-lived machine usually does not need it.
    candidate="$(apt-cache policy chromium 2>/dev/null | awk '/Candidate:/ {print $2}')"
    if [[ -z "${candidate}" || "${candidate}" == "(none)" ]]; then
        echo "ensure_chromium: updating the package lists"
        apt-get update -qq
    fi
    echo "ensure_chromium: installing chromium"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
    chromium_path="$(find_chromium)"
    if [[ -z "${chromium_path}" ]]; then
        echo "ensure_chromium: apt-get installed chromium but no chromium binary was found" >&2
        exit 1
    fi
fi

echo "chromium: ${chromium_path}"
"${chromium_path}" --version
