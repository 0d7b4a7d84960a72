#!/bin/sh
# Post-group action: record a message for the operators (stdout is kept in the run log).
# usage: notify.sh PLAN MESSAGE
set -eu
printf '[%s] %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$1" "$2"
