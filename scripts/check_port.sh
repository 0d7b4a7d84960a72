#!/usr/bin/env bash
# Post-group check: wait until TARGET answers on PORT (TCP), up to $CHECK_TIMEOUT seconds (default 60).
# In a dry run (SITERECOVERY_DRY_RUN=1) it only reports what it would check.
# usage: check_port.sh TARGET PORT [extra args ignored]
set -eu
target=$1
port=$2
if [ "${SITERECOVERY_DRY_RUN:-0}" = 1 ]; then
  echo "dry run: would check ${target}:${port}"
  exit 0
fi
deadline=$(( $(date +%s) + ${CHECK_TIMEOUT:-60} ))
while [ "$(date +%s)" -lt "$deadline" ]; do
  if (exec 3<>"/dev/tcp/${target}/${port}") 2>/dev/null; then
    echo "${target}:${port} answers"
    exit 0
  fi
  sleep 1
done
echo "${target}:${port} did not answer within ${CHECK_TIMEOUT:-60}s" >&2
exit 1
